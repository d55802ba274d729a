"""`threedis batch` in local mode: job files, COCO-MIG import, resume, faults, interrupts, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_batch_support import engine, spec  # noqa: F401 (shared fixtures)
from test_batch_support import (
    images_in, leftovers, manifest_rows, pixels, reference_pixels, write_jobs,
)

from threedis import UserError
from threedis.engine.batch.driver import run_batch
from threedis.engine.batch.jobs import load_jobs
from threedis.engine.batch.local import LocalRunner
from threedis.engine.batch.manifest import sha256_file
from threedis.engine.batch.mig import mig_jobs
from threedis.engine.batch.seeds import parse_seeds
from threedis.engine.cli import main

MIG_FILE = Path(__file__).parent / "data" / "mig_small.yaml"


class CountingEngine:
    """Forwards to a real engine, counts renders, and can raise KeyboardInterrupt at render number N."""

    def __init__(self, engine, interrupt_at: int | None = None) -> None:
        self.engine = engine
        self.device = engine.device
        self.interrupt_at = interrupt_at
        self.renders: list[int] = []

    def render(self, **kwargs):
        if self.interrupt_at is not None and len(self.renders) + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        self.renders.append(kwargs["seed"])
        return self.engine.render(**kwargs)


# ---------------------------------------------------------------- parsing


def test_seeds_are_read_as_written():
    assert parse_seeds("0-3") == (0, 1, 2, 3)
    assert parse_seeds("0,2,5-7") == (0, 2, 5, 6, 7)
    assert parse_seeds(7) == (7,)
    assert parse_seeds([3, 1, 3]) == (3, 1)
    for bad in ("3-1", "a", "-2", [-1], True, "0-999999999"):
        with pytest.raises(UserError):
            parse_seeds(bad)


def test_bad_lines_are_listed_by_number(tmp_path, capsys):
    good = json.dumps({"layout": {"prompt": "x", "width": 64, "height": 64}, "depth": "depth-0.png"})
    extra = [
        "",  # blank lines are allowed and keep the numbering
        "{not json",
        json.dumps({"id": "job0", "layout": {"prompt": "dup", "width": 64, "height": 64}}),  # duplicate id
        json.dumps({"layout": {"prompt": "p", "width": 60, "height": 64}}),  # not a multiple of 16
        json.dumps({"layout": "no-such-layout.json"}),
        json.dumps({"layout": {"prompt": "p", "width": 64, "height": 64}, "depth": "missing.png", "steps": 0}),
        json.dumps({"layout": {"prompt": "p", "width": 64, "height": 64}, "colour": "red"}),
        good,
    ]
    path = write_jobs(tmp_path, jobs=1, seeds="0", extra_lines=extra)
    jobs = load_jobs(path)
    assert [job.line for job in jobs.problems] == [3, 4, 5, 6, 7, 8]
    assert "missing.png" in jobs.problems[4].problem and "steps" in jobs.problems[4].problem
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr().out
    for line in (3, 4, 5, 6, 7, 8):
        assert f"line {line}: INVALID" in out
    assert "line 1:" not in out and "line 9:" not in out
    clean = write_jobs(tmp_path / "clean", jobs=2, seeds="0-1")
    assert main(["validate", str(clean)]) == 0
    assert "ok (2 jobs, 4 items" in capsys.readouterr().out


def test_mig_importer_reads_the_benchmark_format(tmp_path, capsys):
    jobs = mig_jobs(MIG_FILE, size=64)
    assert [job["id"] for job in jobs] == ["mig-0000-11", "mig-0001-42", "mig-0002-7"]
    second = jobs[1]["layout"]
    assert second["prompt"] == ("a photo of a yellow teapot and a blue cup and a blue cup and a white plate on "
                                "a wooden table")  # YAML's folded '? key' form
    assert [(i["prompt"], i["box"]) for i in second["instances"]] == [
        ("a blue cup", [0.1, 0.5, 0.3, 0.8]), ("a blue cup", [0.7, 0.5, 0.9, 0.8]),
        ("a white plate", [0.2, 0.7, 0.8, 0.95]), ("a yellow teapot", [0.35, 0.15, 0.65, 0.6])]
    assert jobs[1]["meta"]["coco_id"] == "42"
    assert all(job["layout"]["width"] == 64 and "depth" not in job for job in jobs)  # stage 1 makes the depth
    out = tmp_path / "mig.jsonl"
    assert main(["batch", "--from-mig", str(MIG_FILE), "--write-jsonl", str(out), "--mig-size", "64"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == jobs
    loaded = load_jobs(out)
    assert not loaded.problems and [len(j.layout.instances) for j in loaded.jobs] == [2, 4, 1]
    assert all(job.stage1 is not None for job in loaded.jobs)


def test_mig_importer_rejects_what_is_not_the_format(tmp_path):
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("!!python/object/apply:os.system ['echo hi']\n")  # safe_load refuses to run it
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("a prompt:\n  a cat:\n  - [0.1, 0.2, 0.3]\n  coco_id: '1'\n")
    for path in (unsafe, wrong, tmp_path / "absent.yaml"):
        with pytest.raises(UserError):
            mig_jobs(path)


# ---------------------------------------------------------------- local mode


def test_local_batch_renders_each_item_once_like_engine_render(tmp_path, spec, engine):
    folder = tmp_path / "in"
    broken = folder / "broken-depth.png"
    jobs_path = write_jobs(folder, jobs=2, seeds="0-2", extra_lines=[json.dumps(
        {"id": "broken", "layout": {"prompt": "p", "width": 64, "height": 64}, "depth": "broken-depth.png",
         "steps": 1})])
    broken.write_bytes(b"not a png")  # exists, so the job is valid, but cannot be read: a failed item
    out = tmp_path / "out"
    summary = run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=engine), progress=False)
    assert (summary.done, summary.failed, summary.skipped) == (6, 1, 0)
    rows = manifest_rows(out)
    assert sorted((r["job"], r["seed"]) for r in rows) == sorted(
        [(f"job{n}", s) for n in range(2) for s in range(3)] + [("broken", 0)])
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["job"] == "broken" and failed[0]["error"] and not failed[0]["files"]
    assert images_in(out) == [f"job{n}/seed-{s}.png" for n in range(2) for s in range(3)]
    assert not leftovers(out)
    for row in (r for r in rows if r["status"] == "done"):
        n = int(row["job"][3:])
        image = out / row["files"]["image"]
        assert sha256_file(image) == row["sha256"]
        assert (out / row["files"]["depth"]).is_file() and (out / row["files"]["report"]).is_file()
        assert row["device"] == "cpu" and row["worker"].startswith("local@") and row["timings"]["render_s"] > 0
        np.testing.assert_array_equal(pixels(image), reference_pixels(engine, folder, n, row["seed"]))
        from PIL import Image

        with Image.open(image) as img:  # the image carries its layout, seed and settings
            assert json.loads(img.text["threedis"])["seed"] == row["seed"]


def test_rerun_skips_done_items_and_renders_corrupted_or_failed_ones(tmp_path, spec, engine):
    folder = tmp_path / "in"
    jobs_path = write_jobs(folder, jobs=2, seeds="0-1", extra_lines=[json.dumps(
        {"id": "late", "layout": {"prompt": "p", "width": 64, "height": 64}, "depth": "late.png", "steps": 1})])
    (folder / "late.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    first = run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=engine), progress=False)
    assert (first.done, first.failed) == (4, 1)

    counting = CountingEngine(engine)
    again = run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=counting), progress=False)
    assert counting.renders == [] and (again.done, again.failed, again.skipped) == (0, 0, 5)

    victim = out / "job1" / "seed-0.png"
    before = pixels(victim)
    victim.write_bytes(victim.read_bytes()[:-20] + b"x" * 20)  # corrupted: no longer its recorded hash
    counting = CountingEngine(engine)
    run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=counting), progress=False)
    assert counting.renders == [0]
    np.testing.assert_array_equal(pixels(victim), before)
    assert sha256_file(victim) == manifest_rows(out)[-1]["sha256"]

    from test_batch_support import write_depth

    write_depth(folder / "late.png", 5)  # fixed: --retry-failed renders the failed item, and only it
    counting = CountingEngine(engine)
    retried = run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=counting), retry_failed=True,
                        progress=False)
    assert counting.renders == [0] and (retried.done, retried.skipped) == (1, 4)
    assert len(images_in(out)) == 5 and not leftovers(out)


def test_interrupted_batch_resumes_without_rendering_anything_twice(tmp_path, spec, engine):
    jobs_path = write_jobs(tmp_path / "in", jobs=2, seeds="0-2")
    out = tmp_path / "out"
    stopping = CountingEngine(engine, interrupt_at=3)  # Ctrl-C while the third item renders
    first = run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=stopping), progress=False)
    assert first.interrupted and first.done == 2
    rows = manifest_rows(out)
    assert len(rows) == 2 and all(sha256_file(out / r["files"]["image"]) == r["sha256"] for r in rows)
    assert len(images_in(out)) == 2 and not leftovers(out)  # the folder matches the manifest

    counting = CountingEngine(engine)
    second = run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=counting), progress=False)
    assert (second.done, second.skipped, second.interrupted) == (4, 2, False)
    keys = [(r["job"], r["seed"]) for r in manifest_rows(out)]
    assert len(keys) == len(set(keys)) == 6  # each item rendered and recorded exactly once overall
    assert images_in(out) == [f"job{n}/seed-{s}.png" for n in range(2) for s in range(3)]


def test_changed_job_is_rendered_again(tmp_path, spec, engine):
    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0")
    out = tmp_path / "out"
    run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=engine), progress=False)
    row = json.loads(jobs_path.read_text().splitlines()[0])
    jobs_path.write_text(json.dumps({**row, "guidance": 3.5}) + "\n")
    counting = CountingEngine(engine)
    run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=counting), progress=False)
    assert counting.renders == [0] and images_in(out) == ["job0/seed-0.png"]


# ---------------------------------------------------------------- CLI


def test_cli_batch_end_to_end_and_resume(tmp_path, tiny_flux_dir, capsys):
    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0")
    out = tmp_path / "out"
    argv = ["batch", str(jobs_path), "--out", str(out), "--seeds", "4", "--model", str(tiny_flux_dir),
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "1 done, 0 failed, 0 skipped" in text and "images/hour" in text
    assert main(argv) == 0
    assert "0 done, 0 failed, 1 skipped" in capsys.readouterr().out


def test_cli_batch_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0")
    cases = [
        ["batch", str(jobs_path)],  # no --out
        ["batch", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "o")],
        ["batch", str(jobs_path), "--out", str(tmp_path / "o"), "--seeds", "5-1"],
        ["batch", str(jobs_path), "--out", str(tmp_path / "o"), "--workers", "2"],  # Ray flag without --ray
        ["batch", "--from-mig", str(MIG_FILE)],  # neither --out nor --write-jsonl
    ]
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("threedis: error: ") and err.count("\n") == 1, err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["batch", str(jobs_path), "--out", str(tmp_path / "o"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "threedis-flux[ray]"' in err and err.count("\n") == 1


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_while_recording_waits_for_the_row(tmp_path, spec, engine, ctrl_c_raises, monkeypatch, signum):
    """Ctrl-C or a kill (the CLI turns SIGTERM into an exception) between the files and the row."""
    import os
    import signal

    from threedis.engine.batch import driver

    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    real_place = driver.place_files

    def place_then_signal(*args, **kwargs):
        written = real_place(*args, **kwargs)
        os.kill(os.getpid(), getattr(signal, signum))  # arrives after the files, before the row
        return written

    monkeypatch.setattr(driver, "place_files", place_then_signal)
    jobs_path = write_jobs(tmp_path / "in", jobs=2, seeds="0")
    out = tmp_path / "out"
    try:
        if signum == "SIGINT":  # the batch stops and says it was interrupted
            summary = run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=engine), progress=False)
            assert summary.interrupted and summary.done == 1
        else:
            with pytest.raises(Stopped):
                run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=engine), progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = manifest_rows(out)
    assert [r["status"] for r in rows] == ["done"], "the first item's row was written before the signal acted"
    assert images_in(out) == [rows[0]["files"]["image"]]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_out_of_memory_is_recorded_and_the_batch_goes_on(tmp_path, spec, engine):
    import torch

    class RunsOutOfMemoryOnSeed1(CountingEngine):
        def render(self, **kwargs):
            if kwargs["seed"] == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return super().render(**kwargs)

    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0-2")
    out = tmp_path / "out"
    summary = run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=RunsOutOfMemoryOnSeed1(engine)),
                        progress=False)
    assert (summary.done, summary.failed) == (2, 1)
    failed = [r for r in manifest_rows(out) if r["status"] == "failed"]
    assert [r["seed"] for r in failed] == [1] and failed[0]["error_type"] == "OutOfMemoryError"
    assert "out of memory" in failed[0]["error"] and failed[0]["traceback"]  # not a user mistake: keep the trace
    assert images_in(out) == ["job0/seed-0.png", "job0/seed-2.png"]


def test_cli_batch_without_model_uses_tiny_checkpoints_and_stage1(tmp_path, capsys):
    """No --model: the tiny built-in checkpoints, as `threedis demo`; a job without depth runs stage 1."""
    jobs_path = tmp_path / "jobs.jsonl"
    jobs_path.write_text(json.dumps({"id": "s1", "layout": {"prompt": "a cat", "width": 64, "height": 64,
                                     "instances": [{"prompt": "a cat", "box": [0.2, 0.2, 0.8, 0.8]}]},
                                     "steps": 1, "stage1": {"steps": 1, "migc_steps": 1, "refine_steps": 0}}) + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(jobs_path), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert "tiny random-weight" in capsys.readouterr().out
    (row,) = manifest_rows(out)
    assert row["status"] == "done" and (out / row["files"]["depth"]).is_file()
    from PIL import Image

    with Image.open(out / row["files"]["image"]) as img:
        depth = json.loads(img.text["threedis"])["depth"]
    assert depth["source"] == "stage1" and depth["size"] == [64, 64]  # the tiny default stage-1 size
    assert depth["refine_steps"] == 0  # the line's stage-1 options reach the render
