"""Shared pieces of the batch tests (no tests here): job files on tiny layouts, reference renders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from threedis.engine.batch.worker import EngineSpec

STEPS = 1


def layout_dict(n: int) -> dict:
    """A 64x64 two-instance layout, different per n."""
    shift = 0.05 * (n % 4)
    return {"prompt": f"scene {n}: a cat and a dog", "width": 64, "height": 64, "instances": [
        {"prompt": f"a cat number {n}", "box": [0.0 + shift, 0.0, 0.5 + shift, 0.5]},
        {"prompt": "a dog", "box": [0.5, 0.4, 1.0, 1.0 - shift]},
    ]}


def write_depth(path: Path, n: int) -> Path:
    ramp = (np.add.outer(np.arange(64), np.arange(64) * (n + 1)) % 256).astype(np.uint8)
    Image.fromarray(ramp).save(path)
    return path


def write_jobs(folder: Path, jobs: int, seeds: str, extra_lines: list[str] = ()) -> Path:
    """`jobs` jobs, each with its own depth map file and `seeds`; job 0's layout is a file, the rest inline."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for n in range(jobs):
        write_depth(folder / f"depth-{n}.png", n)
        layout: object = layout_dict(n)
        if n == 0:
            (folder / "layout-0.json").write_text(json.dumps(layout))
            layout = "layout-0.json"
        lines.append(json.dumps({"id": f"job{n}", "layout": layout, "depth": f"depth-{n}.png", "seeds": seeds,
                                 "steps": STEPS}))
    path = folder / "jobs.jsonl"
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def reference_pixels(engine, folder: Path, n: int, seed: int, threads: int | None = None) -> np.ndarray:
    """The same render straight through Engine.render: the independent reference for batch images.

    threads: torch's thread count for it, that of the process that made the batch image (Ray runs each
    1-CPU actor with one thread): a matmul split over another thread count sums in another order.
    """
    from threedis import Layout

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        result = engine.render(Layout.from_dict(layout_dict(n)), depth=folder / f"depth-{n}.png", seed=seed,
                               steps=STEPS)
    finally:
        torch.set_num_threads(previous)
    return np.asarray(result.image.convert("RGB"))


def manifest_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def images_in(out: Path) -> list[str]:
    """Every final image (seed-<s>.png, not depth/layout/...) under out, as job/name."""
    return sorted(f"{p.parent.name}/{p.name}" for p in out.glob("*/seed-*.png")
                  if p.stem.count("-") == 1)


def leftovers(out: Path) -> list[Path]:
    """Temporary files or numbered duplicates left in the output folder."""
    return [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")
            or (p.suffix == ".png" and p.stem.split("-")[-1].isdigit() and p.stem.count("-") > 1)]


@pytest.fixture(scope="module")
def spec(tiny_flux_dir) -> EngineSpec:
    """One engine description for the batch tests (local and Ray workers build it the same way)."""
    return EngineSpec(model=str(tiny_flux_dir), device="cpu")


@pytest.fixture(scope="module")
def engine(spec):
    return spec.build()
