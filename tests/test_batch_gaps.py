"""`threedis batch` as a new user met it: one writer per folder, one-line errors, honest exit codes, a bad line
recorded once, files checked on resume, manifest paths kept inside the run, line limits, file modes,
protocol flags, and which auxiliary models stay loaded between items."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from test_batch_support import engine, spec  # noqa: F401 (shared fixtures)
from test_batch_support import images_in, manifest_rows, write_jobs

from threedis import UserError
from threedis.engine.batch.driver import run_batch
from threedis.engine.batch.jobs import load_jobs
from threedis.engine.batch.local import LocalRunner
from threedis.engine.cli import main

MIG_FILE = Path(__file__).parent / "data" / "mig_small.yaml"


class Counting:
    """Forwards to a real engine and counts its renders."""

    def __init__(self, real) -> None:
        self.engine, self.device, self.renders = real, real.device, []

    def render(self, **kwargs):
        self.renders.append((kwargs["layout"].prompt, kwargs["seed"]))
        return self.engine.render(**kwargs)


def _cli(jobs_path: Path, out: Path, tiny_flux_dir: Path, *extra: str) -> list[str]:
    return ["batch", str(jobs_path), "--out", str(out), "--model", str(tiny_flux_dir), "--device", "cpu",
            "--no-progress", *extra]


def _one_line(err: str) -> str:
    assert err.startswith("threedis: error: ") and err.count("\n") == 1, err
    return err


def test_a_second_batch_on_the_same_folder_is_refused_and_says_who_holds_it(tmp_path, tiny_flux_dir, capsys):
    from threedis.engine.locks import folder_lock

    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0")
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, "threedis batch"):  # the first command, still running
        assert main(_cli(jobs_path, out, tiny_flux_dir)) == 2
        err = _one_line(capsys.readouterr().err)
        assert f"(pid {os.getpid()} on" in err and "another --out" in err
    assert not (out / "manifest.jsonl").exists()
    assert main(_cli(jobs_path, out, tiny_flux_dir)) == 0  # released: the folder is usable again
    assert not (out / "threedis.lock").exists()


def test_a_full_disk_is_one_line_not_a_traceback(tmp_path, tiny_flux_dir, monkeypatch, capsys):
    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(_cli(jobs_path, tmp_path / "out", tiny_flux_dir)) == 2
    assert "No space left on device" in _one_line(capsys.readouterr().err)


def test_a_read_only_folder_is_one_line(tmp_path, tiny_flux_dir, unwritable, capsys):
    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0")
    assert main(_cli(jobs_path, unwritable, tiny_flux_dir)) == 2
    assert "locked" in _one_line(capsys.readouterr().err)


def test_a_disk_that_fills_up_mid_item_leaves_no_file_of_it(tmp_path, tiny_flux_dir, monkeypatch, capsys):
    """The image is written, then the disk is full: no image without its set and manifest row."""
    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0")
    real, calls = os.fsync, []

    def fills_up(fd):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fills_up)
    out = tmp_path / "out"
    assert main(_cli(jobs_path, out, tiny_flux_dir)) == 2
    assert "No space left on device" in _one_line(capsys.readouterr().err)
    assert len(calls) > 1 and images_in(out) == []
    assert not (out / "job0").exists() or not list((out / "job0").iterdir())  # not the image either


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell the manifest's fsync")
def test_a_disk_that_fills_up_at_the_manifest_row_takes_the_files_back(tmp_path, tiny_flux_dir, monkeypatch, capsys):
    """Files written, the row not: the files go, so the folder and the manifest still agree."""
    real = os.fsync

    def full_at_the_manifest(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("manifest.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", full_at_the_manifest)
    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0")
    out = tmp_path / "out"
    assert main(_cli(jobs_path, out, tiny_flux_dir)) == 2
    assert "No space left on device" in _one_line(capsys.readouterr().err)
    assert images_in(out) == [] and not list((out / "job0").iterdir())


def test_failed_items_keep_the_exit_code_non_zero_until_retried(tmp_path, tiny_flux_dir, capsys):
    folder = tmp_path / "in"
    jobs_path = write_jobs(folder, jobs=1, seeds="0", extra_lines=[json.dumps(
        {"id": "late", "layout": {"prompt": "p", "width": 64, "height": 64}, "depth": "late.png", "steps": 1})])
    (folder / "late.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(_cli(jobs_path, out, tiny_flux_dir)) == 1
    capsys.readouterr()
    assert main(_cli(jobs_path, out, tiny_flux_dir)) == 1  # nothing rendered, but one item is still failed
    text = capsys.readouterr().out
    assert "0 done, 0 failed, 2 skipped" in text and "1 item(s) remain failed" in text
    from test_batch_support import write_depth

    write_depth(folder / "late.png", 3)
    assert main(_cli(jobs_path, out, tiny_flux_dir, "--retry-failed")) == 0


def test_a_bad_line_is_recorded_once_whatever_its_seeds(tmp_path, spec, engine):
    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0", extra_lines=[
        json.dumps({"id": "bad", "layout": {"prompt": "p", "width": 60, "height": 64}, "seeds": "0-99999"}),
        "[" * 50_000 + "]" * 50_000,  # a nesting bomb: one failed line, no RecursionError
        json.dumps({"id": "big", "layout": {"prompt": "x" * 1_000_001, "width": 64, "height": 64}}),
    ])
    jobs = load_jobs(jobs_path)
    assert [j.line for j in jobs.problems] == [2, 3, 4]
    assert "nests more than" in jobs.problems[1].problem and "bytes" in jobs.problems[2].problem
    summary = run_batch(jobs, tmp_path / "out", LocalRunner(spec, engine=engine), progress=False)
    assert (summary.total, summary.done, summary.failed) == (4, 1, 3)
    bad = [r for r in manifest_rows(tmp_path / "out") if r["job"] == "bad"]
    assert len(bad) == 1 and bad[0]["seed"] is None and bad[0]["seeds"] == 100_000
    again = run_batch(load_jobs(jobs_path), tmp_path / "out", LocalRunner(spec, engine=engine), progress=False)
    assert (again.skipped, again.failed_before) == (4, 3)


def test_a_line_is_read_as_strictly_as_a_layout_file(tmp_path):
    layout = '"layout": {"prompt": "p", "width": 64, "height": 64}'
    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0", extra_lines=[
        '{"id": "huge", ' + layout + ', "steps": ' + "9" * 5000 + "}",  # was a ValueError traceback
        '{"id": "twice", "id": "again", ' + layout + "}",
        '{"id": "nan", ' + layout + ', "guidance": NaN}',
    ])
    problems = [j.problem for j in load_jobs(jobs_path).problems]
    assert ["5000 digits" in problems[0], "appears twice" in problems[1], "NaN" in problems[2]] == [True] * 3


def test_resume_checks_every_listed_file_and_only_inside_the_run(tmp_path, spec, engine):
    jobs_path = write_jobs(tmp_path / "in", jobs=2, seeds="0")
    out = tmp_path / "out"
    run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=engine), progress=False)
    rows = {r["job"]: r for r in manifest_rows(out)}
    (out / rows["job0"]["files"]["depth"]).unlink()  # a side file deleted by hand
    # A tampered row: job1's image "is" a file outside the run, with that file's hash.
    outside = tmp_path / "secret.txt"
    outside.write_text("not an image")
    from threedis.engine.batch.manifest import sha256_file

    rows["job1"]["files"]["image"] = os.path.relpath(outside, out)
    rows["job1"]["sha256"] = sha256_file(outside)
    (out / "loop-a").symlink_to("loop-b")  # job0's report "is" inside a symlink loop: not a traceback
    (out / "loop-b").symlink_to("loop-a")
    rows["job0"]["files"]["report"] = "loop-a/report.json"
    with open(out / "manifest.jsonl", "a") as f:
        f.write(json.dumps(rows["job0"]) + "\n" + json.dumps(rows["job1"]) + "\n")
    counting = Counting(engine)
    summary = run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=counting), progress=False)
    assert sorted(seed for _, seed in counting.renders) == [0, 0] and summary.done == 2
    assert (out / rows["job0"]["files"]["depth"]).is_file() and outside.read_text() == "not an image"
    assert images_in(out) == ["job0/seed-0.png", "job1/seed-0.png"]


def test_batch_files_get_a_renders_modes_and_the_thread_count(tmp_path, spec, engine):
    import torch

    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0")
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        run_batch(load_jobs(jobs_path), out, LocalRunner(spec, engine=engine), progress=False)
    finally:
        os.umask(old)
    (row,) = manifest_rows(out)
    modes = {stat.S_IMODE((out / path).stat().st_mode) for path in row["files"].values()}
    assert modes == {0o644}  # as `threedis render` writes them (0o666 less the umask), not mkstemp's 0600
    assert row["settings"]["torch_threads"] == torch.get_num_threads()


def test_auxiliary_model_folders_that_are_not_there_are_one_line_before_any_item(tmp_path, tiny_flux_dir, capsys):
    """A flag's stage-1, SAM2 or depth-estimator folder that a job needs: refused once, no failed row per item."""
    folder = tmp_path / "in"
    jobs_path = write_jobs(folder, jobs=1, seeds="0-2", extra_lines=[
        json.dumps({"id": "stage1", "layout": {"prompt": "p", "width": 64, "height": 64}}),
        json.dumps({"id": "sam", "layout": {"prompt": "p", "width": 64, "height": 64}, "depth": "depth-0.png",
                    "sam": True}),
        json.dumps({"id": "photo", "layout": {"prompt": "p", "width": 64, "height": 64},
                    "depth_from_photo": "depth-0.png"})])
    missing = str(tmp_path / "missing")
    for flag, words in (("--stage1", "stage-1 base model folder not found"), ("--sam", "SAM2 model folder not found"),
                        ("--depth-model", "depth model folder not found")):
        out = tmp_path / f"out{flag}"
        assert main(_cli(jobs_path, out, tiny_flux_dir, flag, missing)) == 2
        assert words in _one_line(capsys.readouterr().err)
        assert not out.exists(), "nothing is written for a refused batch"


def test_a_second_mig_batch_never_replaces_the_job_file_of_the_one_running(tmp_path, tiny_flux_dir, capsys):
    from threedis.engine.locks import folder_lock

    out = tmp_path / "out"
    out.mkdir()
    (out / "jobs-mig.jsonl").write_text("the running command's jobs\n")
    with folder_lock(out, "threedis batch"):  # the first command, still running
        assert main(["batch", "--from-mig", str(MIG_FILE), "--out", str(out), "--model", str(tiny_flux_dir),
                     "--device", "cpu", "--no-progress"]) == 2
        assert "is in use by" in _one_line(capsys.readouterr().err)
    assert (out / "jobs-mig.jsonl").read_text() == "the running command's jobs\n"


def test_write_jsonl_converts_at_the_documented_size(tmp_path, capsys):
    out = tmp_path / "mig.jsonl"
    assert main(["batch", "--from-mig", str(MIG_FILE), "--write-jsonl", str(out)]) == 0  # no --model: still 512
    assert {(j["layout"]["width"], j["layout"]["height"]) for j in map(json.loads, out.read_text().splitlines())} \
        == {(512, 512)}
    assert "(512x512)" in capsys.readouterr().out


def test_protocol_flags_set_what_jobs_leave_out(tmp_path):
    from threedis.engine.batch.command import _defaults, _flag_settings
    from threedis.engine.cli import build_parser

    args = build_parser().parse_args(["batch", "j.jsonl", "--out", "o", "--steps", "20", "--guidance", "10",
                                      "--size", "512"])
    defaults = _defaults(args, tiny=True, changes=_flag_settings(args))
    assert (defaults.steps, defaults.guidance, defaults.size) == (20, 10.0, (512, 512))
    jobs_path = write_jobs(tmp_path / "in", jobs=1, seeds="0")  # its job sets steps itself: kept
    job = load_jobs(jobs_path, defaults).jobs[0]
    assert (job.steps, job.guidance, job.layout.width, job.layout.height) == (1, 10.0, 512, 512)
    for bad in (["--size", "500"], ["--steps", "0"], ["--guidance", "nan"]):
        with pytest.raises(Exception, match="--size|--steps|--guidance"):
            _flag_settings(build_parser().parse_args(["batch", "j.jsonl", *bad]))
    wide = _flag_settings(build_parser().parse_args(["batch", "j.jsonl", "--size", "8192x2048"]))
    assert wide["size"] == (8192, 2048)  # the layout's limits (a side to 8192, 16.8 megapixels), not stage 1's
    for bad, words in (("8208x16", "up to 8192"), ("4608x4096", "more than the limit")):
        with pytest.raises(UserError, match=words):
            _flag_settings(build_parser().parse_args(["batch", "j.jsonl", "--size", bad]))


def test_auxiliary_models_stay_loaded_when_the_plan_allows_and_say_so(tiny_flux_dir, monkeypatch):
    from threedis import Engine, Stage1Options, UserError
    from threedis.engine.batch.worker import EngineSpec, Largest

    stage1_spec = EngineSpec(model=str(tiny_flux_dir), device="cpu", profile="cpu", needs=frozenset({"stage1"}),
                             largest=Largest(64, 64, 2, Stage1Options(size=64)))
    built, notes = stage1_spec.build_with_notes()
    assert built.profile.policy("ldm3d_unet").device.value == "cpu"  # the cpu profile's cpu-then-freed, kept
    assert notes == ["stage 1 stays loaded across items (the memory plan allows it; the profile cpu frees it after "
                     "each render)"]

    def too_big(self, *args, **kwargs):
        raise UserError("this CPU render needs 40 GB of RAM")

    monkeypatch.setattr(Engine, "check_fits", too_big)
    built, notes = stage1_spec.build_with_notes()
    assert built.profile.policy("ldm3d_unet").device.value == "cpu-then-freed"
    assert "loaded for every item" in notes[0] and "40 GB" in notes[0]
