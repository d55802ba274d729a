"""Batch throughput on the tiny model: local mode vs Ray with N workers, and the scheduling overhead.

Renders the same items (64x64 layouts with depth maps given as files, tiny
random-weight checkpoint) once in local mode (one engine in this process) and
once on a local Ray instance with --workers actors, each through
`threedis.engine.batch.driver.run_batch`, the code path of `threedis batch`.
Per mode it reports images per hour over the whole run (startup included) and
in steady state (each worker's first item, which loads the models, left out),
the mean render time, and the scheduling overhead per item: how long a worker
sits idle between handing back one item and starting the next (dispatch,
result transfer, the driver writing files and the manifest row).

Both modes run torch with --threads CPU threads per engine (default 1: what a
Ray actor with one CPU gets), so the ratio compares the scheduling, not the
thread pools (on a shared, busy CPU two threads per engine can be many times
slower than one).

Usage: python bench/batch.py [--items 16] [--workers 2] [--steps 2] [--threads 1] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from threedis.engine.batch.driver import run_batch
from threedis.engine.batch.jobs import load_jobs
from threedis.engine.batch.local import LocalRunner
from threedis.engine.batch.worker import EngineSpec, Outcome, tiny_checkpoint
from threedis.kernels.bench_attention import versions


def write_jobs(folder: Path, items: int, steps: int) -> Path:
    """`items` jobs of one seed each, 64x64 two-instance layouts with their own depth maps."""
    lines = []
    for n in range(items):
        ramp = (np.add.outer(np.arange(64), np.arange(64) * (n + 1)) % 256).astype(np.uint8)
        Image.fromarray(ramp).save(folder / f"depth-{n}.png")
        layout = {"prompt": f"scene {n}", "width": 64, "height": 64, "instances": [
            {"prompt": "a cat", "box": [0.0, 0.0, 0.5, 0.5]}, {"prompt": "a dog", "box": [0.5, 0.4, 1.0, 1.0]}]}
        lines.append(json.dumps({"id": f"item{n}", "layout": layout, "depth": f"depth-{n}.png", "steps": steps}))
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(outcomes: list[Outcome], wall_s: float) -> dict:
    """Throughput, steady-state throughput, mean render time and idle gap per item."""
    by_worker: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_worker.setdefault(outcome.worker, []).append(outcome)
    gaps, steady_items, steady_spans = [], 0, []
    for runs in by_worker.values():
        runs.sort(key=lambda o: o.started)
        gaps += [b.started - a.finished for a, b in zip(runs, runs[1:])]
        if len(runs) > 1:
            steady_items += len(runs) - 1
            steady_spans.append(runs[-1].finished - runs[0].finished)
    steady_s = max(steady_spans) if steady_spans else 0.0
    renders = [o.timings.get("render_s", 0.0) for o in outcomes]
    return {
        "items": len(outcomes), "workers": len(by_worker), "wall_s": wall_s,
        "items_per_hour": len(outcomes) * 3600.0 / wall_s if wall_s else None,
        "steady_items_per_hour": steady_items * 3600.0 / steady_s if steady_s else None,
        "render_s_mean": statistics.fmean(renders) if renders else None,
        "overhead_s_per_item": statistics.fmean(gaps) if gaps else None,
        "overhead_s_per_item_max": max(gaps) if gaps else None,
    }


def run_mode(mode: str, jobs_path: Path, spec: EngineSpec, workers: int) -> dict:
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="threedis-bench-batch-") as out:
        if mode == "local":
            runner = LocalRunner(spec)
        else:
            from threedis.engine.batch.ray_runner import RayRunner

            runner = RayRunner(spec, address="local", workers=workers, gpus_per_worker=0)
        start = time.perf_counter()
        summary = run_batch(load_jobs(jobs_path), out, runner, progress=False, on_outcome=outcomes.append)
        wall = time.perf_counter() - start
    if summary.failed:
        raise SystemExit(f"{mode}: {summary.failed} item(s) failed")
    return {"mode": mode, **measure(outcomes, wall)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per engine (default 1)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # Ray workers started from here inherit it
    spec = EngineSpec(model=tiny_checkpoint("flux"), device="cpu")
    device = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}
    rows = []
    with tempfile.TemporaryDirectory(prefix="threedis-bench-jobs-") as folder:
        jobs_path = write_jobs(Path(folder), args.items, args.steps)
        for mode in ("local", "ray"):
            row = run_mode(mode, jobs_path, spec, args.workers)
            rows.append({"bench": "batch", "model": "tiny", "size": "64x64", "steps": args.steps, **row,
                         **device, "versions": versions()})
    local, ray = rows
    for key in ("items_per_hour", "steady_items_per_hour"):
        if local[key] and ray[key]:
            ray[f"{key}_vs_local"] = ray[key] / local[key]
    print(f"{'mode':<6} {'workers':>7} {'items':>5} {'wall s':>7} {'items/h':>9} {'steady/h':>9} "
          f"{'render s':>8} {'idle s/item':>11}")
    for row in rows:
        print(f"{row['mode']:<6} {row['workers']:>7} {row['items']:>5} {row['wall_s']:>7.1f} "
              f"{row['items_per_hour']:>9.0f} {row['steady_items_per_hour'] or 0:>9.0f} "
              f"{row['render_s_mean']:>8.3f} {row['overhead_s_per_item'] or 0:>11.4f}")
    for key in ("items_per_hour_vs_local", "steady_items_per_hour_vs_local"):
        if key in ray:
            print(f"ray/local {key.replace('_vs_local', '')}: {ray[key]:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"batch-tiny-{device['device']}.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
