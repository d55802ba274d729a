"""`threedis batch --ray` on a local Ray instance with two CPU workers (Ray is in the test extra)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from test_batch_support import engine, spec  # noqa: F401 (shared fixtures)
from test_batch_support import images_in, leftovers, manifest_rows, pixels, reference_pixels, write_jobs

from threedis.engine.batch.driver import run_batch
from threedis.engine.batch.jobs import load_jobs
from threedis.engine.batch.manifest import sha256_file
from threedis.engine.batch.ray_runner import RayRunner, plan_workers, start_local_ray

ray = pytest.importorskip("ray", reason="Ray is part of the test extra: pip install -e '.[test]'")

ALL_ITEMS = [f"job{n}/seed-{s}.png" for n in range(4) for s in range(3)]


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(ray, num_cpus=2)
    yield ray
    ray.shutdown()


def check_complete(out, rows):
    keys = [(r["job"], r["seed"]) for r in rows]
    assert sorted(keys) == sorted((f"job{n}", s) for n in range(4) for s in range(3))  # once each
    assert all(r["status"] == "done" for r in rows)
    assert images_in(out) == ALL_ITEMS and not leftovers(out)
    assert all(sha256_file(out / r["files"]["image"]) == r["sha256"] for r in rows)


def test_ray_batch_matches_engine_render_pixel_for_pixel(tmp_path, local_ray, spec, engine):
    folder = tmp_path / "in"
    jobs = load_jobs(write_jobs(folder, jobs=4, seeds="0-2"))
    out = tmp_path / "out"
    runner = RayRunner(spec, workers=2, gpus_per_worker=0)
    summary = run_batch(jobs, out, runner, progress=False)
    assert (summary.done, summary.failed, summary.retried) == (12, 0, 0)
    rows = manifest_rows(out)
    check_complete(out, rows)
    assert len({r["worker"] for r in rows}) == 2 and all(r["worker"].startswith("ray-") for r in rows)
    assert all(r["worker"] != "local" and r["device"] == "cpu" for r in rows)
    for row in rows:
        np.testing.assert_array_equal(pixels(out / row["files"]["image"]),
                                      reference_pixels(engine, folder, int(row["job"][3:]), row["seed"],
                                                       threads=1))
    assert set(summary.workers) == {r["worker"] for r in rows}
    assert [info["nice"] for info in runner.worker_info] == [0, 0]  # not Ray's default 15: they do the work


def test_killed_worker_has_its_items_finished_by_the_other(tmp_path, local_ray, spec):
    jobs = load_jobs(write_jobs(tmp_path / "in", jobs=4, seeds="0-2"))
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_first_worker(outcome):
        if not killed:
            killed.append(outcome.pid)
            os.kill(outcome.pid, signal.SIGKILL)  # the worker that just delivered still has items queued

    resent: list[str] = []
    runner = RayRunner(spec, workers=2, gpus_per_worker=0, on_resend=lambda item: resent.append(item.name))
    summary = run_batch(jobs, out, runner, progress=False, on_outcome=kill_first_worker)
    assert summary.done == 12 and summary.failed == 0 and summary.retried == len(resent) >= 1
    rows = manifest_rows(out)
    check_complete(out, rows)
    by_name = {f"{r['job']}/seed-{r['seed']}": r for r in rows}
    for name in resent:  # what the killed worker held was rendered by the other one
        assert not by_name[name]["worker"].endswith(f":{killed[0]}")


def test_workers_default_to_one_per_gpu():
    assert plan_workers({"GPU": 4.0, "CPU": 32.0}, None, None) == (4, 1.0)
    assert plan_workers({"GPU": 4.0}, None, 2) == (2, 2)
    assert plan_workers({"CPU": 8.0}, None, None) == (1, 0.0)
    assert plan_workers({"CPU": 8.0}, 3, 0) == (3, 0)
    from threedis import UserError

    for args in ((8, 1), (None, 8), (0, 0)):
        with pytest.raises(UserError):
            plan_workers({"GPU": 4.0}, *args)
    with pytest.raises(UserError):
        plan_workers({"CPU": 2.0}, 3, 0)  # one CPU per actor


def test_interrupted_ray_batch_resumes_from_the_cli(tmp_path, local_ray, spec, tiny_flux_dir, capsys):
    from threedis.engine.cli import main

    jobs_path = write_jobs(tmp_path / "in", jobs=2, seeds="0-1")
    out = tmp_path / "out"

    def ctrl_c(outcome):
        raise KeyboardInterrupt  # as Ctrl-C right after the first item was recorded

    first = run_batch(load_jobs(jobs_path), out, RayRunner(spec, workers=2, gpus_per_worker=0), progress=False,
                      on_outcome=ctrl_c)
    assert first.interrupted and first.done == 1
    done_before = [(r["job"], r["seed"]) for r in manifest_rows(out)]
    assert len(done_before) == 1 and len(images_in(out)) == 1 and not leftovers(out)
    assert main(["batch", str(jobs_path), "--out", str(out), "--model", str(tiny_flux_dir), "--device", "cpu",
                 "--ray", "--workers", "2", "--gpus-per-worker", "0", "--no-progress"]) == 0
    assert "3 done, 0 failed, 1 skipped" in capsys.readouterr().out
    keys = [(r["job"], r["seed"]) for r in manifest_rows(out)]
    assert len(keys) == len(set(keys)) == 4 and keys[0] == done_before[0]  # nothing rendered twice
    assert len(images_in(out)) == 4 and not leftovers(out)
