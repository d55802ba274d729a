"""The report header reads as text: dicts as key=value, nested ones as sub-lines, nothing cut off."""

from __future__ import annotations

from threedis.engine.report import Report

LONG = "auto on cpu / bfloat16: sdpa; off CUDA the triton kernel does not run compiled and eager " \
       "FlexAttention is slower than SDPA with one dense mask"


def _header(info: dict) -> list[str]:
    text = Report(info=info).table()
    return text.splitlines()[1:text.splitlines().index("")]


def test_flat_dict_is_key_value_pairs():
    assert _header({"text encoders loaded": {"clip": 1, "t5": 0}}) == ["  text encoders loaded: clip=1, t5=0"]


def test_nested_dict_is_one_line_per_entry():
    info = {"placement": {"transformer": {"weights": "nf4", "device": "gpu"}, "vae": {"weights": "bf16"}}}
    assert _header(info) == ["  placement:", "    transformer: weights=nf4, device=gpu", "    vae: weights=bf16"]


def test_long_values_wrap_instead_of_being_cut():
    lines = _header({"reason": LONG, "steps": [0, 1, 2], "cache": None})
    assert all(len(line) <= 100 for line in lines)
    assert " ".join(line.strip() for line in lines[:-2]) == f"reason: {LONG}"
    assert lines[-2:] == ["  steps: [0, 1, 2]", "  cache: -"]
    assert "..." not in "\n".join(lines) and "{" not in "\n".join(lines)
