"""The README's Python API block runs as copied (on the tiny checkpoints it names)."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_one_python_block_in_the_api_section():
    text = README.read_text(encoding="utf-8")
    api = text[text.index("## Python API"):]
    api = api[: api.index("\n## ", 1)]
    assert len(python_blocks(api)) == 1 and len(python_blocks(text)) == 1


def test_readme_python_block_runs_as_copied(tmp_path, monkeypatch, capsys):
    (block,) = python_blocks(README.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)  # the snippet writes out/ into the working directory
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "stage 1: 4/4" in out and "denoising: 4/4" in out and "threedis profile" in out
    assert {"image.png", "depth.png", "regions.png", "report.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    with Image.open(tmp_path / "out" / "image.png") as image:
        assert image.size == (256, 256)
