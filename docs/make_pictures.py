"""Regenerate the pictures in docs/pictures/ from a bundled example layout.

    python docs/make_pictures.py [example-name]

Writes <name>-layout.png (boxes and labels), <name>-regions.png (token cells per
instance) and <name>-attention*.png (the allowed matrix at step 0 and after each
phase change of the demos' schedule), using the same functions as every render.
"""

from __future__ import annotations

import sys
from pathlib import Path

from threedis.engine.layout import Layout, example_path
from threedis.engine.pictures import draw_layout, rule_pictures
from threedis.kernels.rule import Schedule, box_regions


def main(name: str = "reading_girl") -> None:
    out = Path(__file__).resolve().parent / "pictures"
    out.mkdir(exist_ok=True)
    layout = Layout.load(example_path(name))
    draw_layout(layout).resize((512, 512 * layout.height // layout.width)).save(out / f"{name}-layout.png")
    regions = box_regions(layout.boxes, *layout.grid)
    schedule = Schedule(steps=20, hard=20, i2i=4, i2t=20, t2i=20, t2t=20)  # the authors' demo defaults
    for key, picture in rule_pictures(regions, [i.prompt for i in layout.instances], 200, schedule).items():
        path = out / f"{name}-{key}.png"
        picture.save(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
