"""A depth job: the layout's depth map (stage 1) or a photo's (Depth Anything), with no FLUX render.

Both go through the public Engine (depth_from_layout, depth_from_image); this module
only writes the results as one set of files. A photo's depth needs only the layout's
size, so its layout may still have empty prompts.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from PIL import Image

    from threedis import Engine, Layout, Stage1Options


def stage1_depth(engine: "Engine", layout: "Layout", folder: Path, seed: int, stage1: "Stage1Options",
                 on_step: Callable[[int, int], None], cancel: threading.Event) -> dict[str, Path]:
    """depth.png and stage1-rgb.png (at the layout size) and report.json of stage 1 on `layout`."""
    from PIL import Image

    size = (layout.width, layout.height)
    made = engine.depth_from_layout(layout, seed=seed, stage1=stage1, on_stage1_step=on_step, cancel=cancel)
    pictures = {"depth.png": made.depth.resize(size, Image.Resampling.BICUBIC),
                "stage1-rgb.png": made.rgb.resize(size, Image.Resampling.BICUBIC)}
    body = {"depth": made.settings, "layout": layout.to_dict(), "report": made.report.to_dict()}
    return _write(folder, pictures, body)


def photo_depth(engine: "Engine", photo: Path, size: tuple[int, int], layout_json: Any,
                folder: Path) -> dict[str, Path]:
    """depth.png (at `size`) and report.json of Depth Anything on an uploaded photo."""
    pictures = {"depth.png": engine.depth_from_image(photo, size=size)}
    return _write(folder, pictures, {"depth": {"source": "photo"}, "layout": layout_json, "report": None})


def _write(folder: Path, pictures: dict[str, "Image.Image"], report: dict) -> dict[str, Path]:
    """The pictures and report.json, each renamed into `folder` once all are written; name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".depth-") as tmp:
        staged = {}
        for name, image in pictures.items():
            staged[name] = Path(tmp) / name
            image.save(staged[name])
        staged["report.json"] = Path(tmp) / "report.json"
        staged["report.json"].write_text(json.dumps(report, indent=2), encoding="utf-8")
        paths = {}
        for name, path in staged.items():
            os.replace(path, folder / name)
            paths[name] = folder / name
    return paths
