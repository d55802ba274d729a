"""A depth job: the layout's depth map (stage 1) or a photo's (Depth Anything), with no FLUX render.

Both go through the public Engine (depth_from_layout, depth_from_image); this module
only writes the results as one set of files.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

from PIL import Image

from threedis import Engine, Layout, Stage1Options


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
        made = engine.depth_from_layout(layout, seed=seed, stage1=stage1, on_stage1_step=on_step, cancel=cancel)
        pictures["depth.png"] = made.depth.resize(size, Image.Resampling.BICUBIC)
        pictures["stage1-rgb.png"] = made.rgb.resize(size, Image.Resampling.BICUBIC)
        report = made.report
        info = made.settings
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
