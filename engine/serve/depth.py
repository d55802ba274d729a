"""A depth job: the layout's depth map (stage 1) or a photo's (Depth Anything), with no FLUX render.

The public Engine has depth_from_image() for photos but no stage-1-only call, so
stage 1 is run here through the engine's auxiliary-model holder and the stage
function it uses itself. This is the one place the service goes past the public
API; when Engine grows a layout -> depth method, only `_stage1` changes.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from threedis import Engine, Layout, Stage1Options


def _stage1(engine: Engine, layout: Layout, options: Stage1Options, on_step: Callable[[int, int], None],
            cancel: threading.Event) -> tuple[Image.Image, Image.Image, Any]:
    from threedis.engine.profiler import Profiler
    from threedis.engine.stages import run_stage1

    prof = Profiler(device=engine.device)
    try:
        result = run_stage1(engine.aux, layout, options, True, prof, on_step, cancel)
    finally:
        engine.aux.free()
    return result.depth, result.rgb, prof.report()


def make_depth(engine: Engine, layout: Layout, folder: Path, seed: int, stage1: Stage1Options | None,
               photo: Path | None, on_step: Callable[[int, int], None], cancel: threading.Event) -> dict[str, Path]:
    """Write depth.png (at the layout size), stage1-rgb.png when stage 1 ran, and report.json; name -> path."""
    size = (layout.width, layout.height)
    pictures: dict[str, Image.Image] = {}
    report = None
    if photo is not None:
        pictures["depth.png"] = engine.depth_from_image(photo, size=size)
        info = {"source": "photo"}
    else:
        options = stage1 if stage1.seed is not None else Stage1Options(**{**stage1.to_dict(), "seed": seed})
        depth, rgb, report = _stage1(engine, layout, options, on_step, cancel)
        pictures["depth.png"] = depth.resize(size, Image.Resampling.BICUBIC)
        pictures["stage1-rgb.png"] = rgb.resize(size, Image.Resampling.BICUBIC)
        info = {"source": "stage1", **options.to_dict()}
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".depth-") as tmp:
        staged = {}
        for name, image in pictures.items():
            staged[name] = Path(tmp) / name
            image.save(staged[name])
        staged["report.json"] = Path(tmp) / "report.json"
        body = {"depth": info, "layout": layout.to_dict(), "report": report.to_dict() if report else None}
        staged["report.json"].write_text(json.dumps(body, indent=2), encoding="utf-8")
        paths = {}
        for name, path in staged.items():
            os.replace(path, folder / name)
            paths[name] = folder / name
    return paths
