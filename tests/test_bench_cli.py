"""`threedis bench attention` for a user: results where they ran it, reasons said once, no CPU speed ratios."""

from __future__ import annotations

import json

from threedis.engine.cli import main


def test_bench_attention_writes_to_the_current_folder_and_explains_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "attention", "--device", "cpu", "--cases", "256x256-n2,256x256-n4", "--phases", "early,late",
            "--heads", "1", "--warmup", "0", "--reps", "1", "--backends", "flash,sdpa,nosuch"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("attention-*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 12 and all(r["device"] == "cpu" for r in rows)
    timed = [r for r in rows if "skipped" not in r]
    assert len(timed) == 8 and all(r["ratio_to_flash"] is None and r["tflops_computed"] is None for r in timed)
    # four cases x phases skipped the unknown backend: one line says so, without the Python API advice
    assert sum("nosuch" in line for line in out.splitlines()) == 1 and "skipped nosuch (4 cases)" in out and "backend='auto'" not in out
    assert "no speed ratios" in out
