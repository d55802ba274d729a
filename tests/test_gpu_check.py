"""bench/gpu_check.py, the one prepared GPU check: its dry run on the CPU, its budget, its goal table.

The dry run is the check's own test: every part runs at tiny sizes in one process, and
the kernels' rows are real comparisons (Triton's interpreter and eager FlexAttention
against a float64 reference). The goal table is checked on hand-made CUDA rows whose
verdicts are worked out by hand below. No GPU is needed.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "bench" / "gpu_check.py"
PARTS = ("environment", "cuda-tests", "kernel-correctness", "attention-bench", "renders", "stage1-sam2", "eval-mig")


@pytest.fixture
def bench_module(monkeypatch):
    """Import a module of bench/ (a scripts folder, not a package) as `python bench/x.py` sees it."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while it runs
        spec.loader.exec_module(module)
        return module

    return load


def _run(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    done = subprocess.run([sys.executable, str(CHECK), "--dry-run", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    (rows_file,) = out.glob("gpu-cpu-dry-run-*.jsonl")
    return done, [json.loads(line) for line in rows_file.read_text().splitlines()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    done, rows = _run(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout, rows


@pytest.mark.slow
def test_dry_run_runs_every_part_and_leaves_gpu_figures_unmeasured(dry_run):
    out, stdout, rows = dry_run
    assert sorted(p.name.split("-")[0] for p in out.iterdir()) == ["goals", "gpu", "pytest"]  # 3 files come back
    assert {r["part"] for r in rows} == {*PARTS, "goals"}
    assert all(r["device_type"] in ("cpu", "n/a") and "versions" in r and "device" in r and r["run"] for r in rows)
    assert not [r for r in rows if r["status"] == "error"], [r for r in rows if r["status"] == "error"]

    env = next(r for r in rows if r["what"] == "environment")
    assert env["cuda"] is False and env["imports"]["diffusers"] == "ok" and "float32" in env["kernel_configs"]
    tests = next(r for r in rows if r["what"] == "pytest -m gpu")
    assert tests["passed"] == tests["failed"] == 0 and tests["skipped"] >= 9  # every CUDA test skips here
    assert (out / tests["log"]).read_text().count("SKIPPED") == tests["skipped"]

    checks = [r for r in rows if r["what"] == "correctness" and r["status"] != "not measured"]
    assert {r["backend"] for r in checks} == {"triton", "flex"} and all(r["status"] == "ok" for r in checks)
    assert all(r["tiles_sound"] and r["tiles_exact"] for r in checks if r["backend"] == "triton")
    assert {r["dtype"] for r in rows if r["what"] == "correctness" and r["status"] == "not measured"} == {
        "bfloat16", "float16"}
    timed = [r for r in rows if r["what"] == "attention"]
    assert {r["backend"] for r in timed} == {"flash", "triton", "flex", "sdpa"}
    assert all(r["ratio_to_flash"] is None for r in timed)  # no CPU speed ratios

    renders = {r["label"]: r for r in rows if r["what"] == "render"}
    assert len(renders) == 8 and all(renders[k]["render_status"] == "ok" for k in ("12gb-n9", "resident-n9", "8gb-n9"))
    assert renders["resident-n9"]["overrides"] == {"transformer.offload": "none", "t5.offload": "none"}
    assert renders["16gb-n4"]["status"] == "not measured"
    diff = next(r for r in rows if r["what"] == "stage1 fp16 vs fp32")
    assert 0 < diff["depth_mean_abs"] < 0.05 and diff["depth_max_abs"] < 0.5  # rounding, not another model
    assert next(r for r in rows if r["what"] == "sam2")["masks_found"] == 9

    built = next(r for r in rows if r["what"] == "eval mig models")
    assert built["weights"] == "random, tiny configs" and built["detector_side"] == built["sam_side"] == 64
    assert 0 < built["params"]["detector"] < 1e6 and 0 < built["params"]["sam"] < 1e6
    timed = next(r for r in rows if r["what"] == "eval mig")
    # 3 timed images after 1 warm-up: levels 3, 4, 5 (synthetic() cycles 2..6), every one placed right and cut by SAM
    assert timed["status"] == "ok" and timed["images"] == 3 and timed["instances"] == 12 and not timed["images_cut"]
    assert timed["placed_right"] == 1.0 and timed["sam_images"] == 3 and timed["sam_boxes"] == 12
    assert 3 <= timed["detector_pairs"] <= 12  # one detection per (image, class); classes repeat at most
    assert timed["minutes_for_800x4"] == pytest.approx(3200 * timed["s_per_image"] / 60)
    assert timed["s_per_image"] >= timed["detector_s_per_image"] + timed["sam_s_per_image"] > 0
    assert timed["peak_allocated_gb"] is None and timed["dtype"] == "float32"

    goals = [r for r in rows if r["part"] == "goals"]
    assert len(goals) == 13 and all(g["result"] == "not measured" and "CPU" in g["detail"] for g in goals)
    table = next(out.glob("goals-*.md")).read_text()
    assert "| goal | result | value | detail |" in table and "0 met, 0 missed, 13 not measured" in table
    assert stdout.rstrip().endswith("0 met, 0 missed, 13 not measured")  # the table is the output's end


def test_a_budget_too_small_for_any_part_marks_each_not_measured(tmp_path):
    done, rows = _run(tmp_path, "--budget-s", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = {r["part"]: r["why"] for r in rows if r["what"] == r["part"]}
    assert set(skipped) == set(PARTS) and all(why.startswith("budget: needs ~") for why in skipped.values())
    assert all(r["result"] == "not measured" for r in rows if r["part"] == "goals")


def test_a_run_cut_off_before_its_table_gets_it_from_its_rows(tmp_path):
    done, rows = _run(tmp_path, "--budget-s", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    (rows_file,) = tmp_path.glob("gpu-*.jsonl")
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows if r["part"] != "goals"))  # as if killed
    for table in tmp_path.glob("goals-*.md"):
        table.unlink()
    again = subprocess.run([sys.executable, str(CHECK), "--out", str(tmp_path), "--table-only"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.rstrip().endswith("0 met, 0 missed, 13 not measured")
    assert len(list(tmp_path.glob("goals-cpu-dry-run-*.md"))) == 1
    goals = [json.loads(line) for line in rows_file.read_text().splitlines() if json.loads(line)["part"] == "goals"]
    assert len(goals) == 13


def test_unknown_parts_are_refused_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(CHECK), "--out", str(tmp_path), "--parts", "3,nine"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "gpu_check: error: unknown part(s) ['nine']; choose numbers 1-7 or environment, cuda-tests, "
        "kernel-correctness, attention-bench, renders, stage1-sam2, eval-mig"]


# -- the goal table on hand-made CUDA rows -------------------------------------------------------------

def _cuda_row(part: str, what: str, status: str = "ok", **fields) -> dict:
    return {"part": part, "what": what, "status": status, "device_type": "cuda", "run": "r1", **fields}


def _attention(case: str, phase: str, backend: str, p50: float, **fields) -> dict:
    return _cuda_row("attention-bench", "attention", backend=backend, case=case, phase=phase, p50_ms=p50, **fields)


def test_goal_table_verdicts_worked_by_hand(bench_module):
    goals = bench_module("gpucheck_goals")
    rows = [
        _attention("1024x1024-n9", "early", "flash", 2.0, ratio_to_flash=None),
        # 1.0 ms against flash 2.0 ms: 0.5x flash; over a tile fraction of 0.4 that is 1.25x (> 1.15: missed)
        _attention("1024x1024-n9", "early", "triton", 1.0, ratio_to_flash=0.5, tile_fraction=0.4,
                   extra_mem_bytes=600_000),
        _attention("1024x1024-n9", "early", "flex", 1.3),  # 1.3x slower than the kernel: met
        _attention("1024x1024-n9", "early", "sdpa", 2.5),  # 2.5x: under 3x, missed
        _cuda_row("renders", "render", label="12gb-n9", render_status="ok", measured_peak_device_gb=11.5,
                  plan_vs_measured=1.05, s_per_computed_step={"p50": 1.2}),
        _cuda_row("renders", "render", "failed", label="8gb-n9", render_status="OutOfMemoryError: CUDA out of memory"),
        _cuda_row("renders", "render", "not measured", label="resident-n9", why="budget: 40 s left"),
        _cuda_row("kernel-correctness", "correctness", backend="triton", rel_err=3e-3, dtype="bfloat16"),
        _cuda_row("kernel-correctness", "correctness", "failed", backend="flex", rel_err=0.2, dtype="float16",
                  case="768x1024-n4", phases="t2t", max_abs_err=0.9),
        _cuda_row("cuda-tests", "pytest -m gpu", passed=9, failed=0, errors=0, failures=[]),
        # 0.45 s an image: 3200 images take 1440 s = 24 min, under the hour
        _cuda_row("eval-mig", "eval mig", images=64, s_per_image=0.45, minutes_for_800x4=24.0,
                  detector_s_per_image=0.15, sam_s_per_image=0.25, peak_allocated_gb=30.5),
    ]
    got = {o.goal: o for o in goals.evaluate(rows)}
    assert [(o.result, o.value) for o in goals.evaluate(rows)][:5] == [
        ("missed", "1.25x"), ("met", "0.5x flash"), ("met", "1.3x"), ("missed", "2.5x"), ("met", "0.600 MB")]
    assert got["12gb peak <= 12 GiB at 1024^2, 9 instances"].result == "met"
    assert got["8gb peak <= 8 GiB at 1024^2, 9 instances"].result == "missed"
    offload = got["12gb s/step <= 1.25x the resident baseline (1024^2, 9 instances)"]
    assert offload.result == "not measured" and offload.detail == "budget: 40 s left"
    assert got["planner within 10% of the measured peak"].result == "met"
    correct = next(o for o in goals.evaluate(rows) if o.goal.startswith("Triton and FlexAttention"))
    assert correct.result == "missed" and "flex 768x1024-n4 float16 t2t" in correct.detail
    assert got["CUDA tests pass"].result == "met"
    assert got["stage 1 fp16 vs fp32 depth (same weights, seed, layout)"].result == "not measured"
    eval_goal = got["eval mig: 800 prompts x 4 seeds in under an hour on one GPU (fp32)"]
    assert (eval_goal.result, eval_goal.value) == ("met", "24.0 min")
    assert "450 ms/image (detector 150, SAM 250)" in eval_goal.detail
    slow = [r if r["part"] != "eval-mig" else {**r, "minutes_for_800x4": 75.0} for r in rows]
    assert {o.goal: o for o in goals.evaluate(slow)}[eval_goal.goal].result == "missed"
    # a CPU row never counts: the same rows measured on the CPU leave every goal unmeasured
    cpu = [{**r, "device_type": "cpu"} for r in rows]
    assert {o.result for o in goals.evaluate(cpu)} == {"not measured"}


def test_a_rerun_part_replaces_that_parts_rows_only(bench_module):
    check = bench_module("gpu_check")
    rows = [{"part": "renders", "run": "a", "what": "render"}, {"part": "attention-bench", "run": "a"},
            {"part": "renders", "run": "b", "what": "render"}, {"part": "goals", "run": "a"}]
    assert check.latest_runs(rows) == [rows[1], rows[2]]


# -- the CUDA tests the check runs ---------------------------------------------------------------------

def _skips_without_cuda(node: ast.AST) -> bool:
    text = ast.unparse(node)
    return "skipif" in text and "cuda.is_available" in text


def test_every_test_that_skips_without_cuda_is_marked_gpu():
    """`pytest -m gpu` (what the GPU check runs) must select every test that skips without CUDA."""
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        source = path.read_text(encoding="utf-8")
        if "cuda.is_available" not in source:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and any(_skips_without_cuda(d) for d in node.decorator_list):
                if not any(ast.unparse(d).endswith("mark.gpu") for d in node.decorator_list):
                    unmarked.append(f"{path.name}::{node.name}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "param":
                marks = next((k.value for k in node.keywords if k.arg == "marks"), None)
                if marks is not None and _skips_without_cuda(marks) and "mark.gpu" not in ast.unparse(marks):
                    unmarked.append(f"{path.name}: pytest.param at line {node.lineno}")
    assert not unmarked, unmarked


def test_parts_that_run_to_their_caps_leave_the_renders_their_time(bench_module, tmp_path, monkeypatch):
    """A GPU run's schedule on a fake clock: parts 3 and 4 measure until they are cut, yet parts 5 and 6
    (the 12gb/8gb and stage-1 rows) still start within the default 480 s; part 7 runs on what is left."""
    check = bench_module("gpu_check")
    now = [0.0]
    monkeypatch.setattr(check.time, "time", lambda: now[0])
    started = []

    def runner(part, part_deadline):
        started.append(part.number)
        assert part_deadline <= 480
        now[0] = part_deadline if part.number in (3, 4) else now[0] + part.estimate(False)

    monkeypatch.setattr(check, "_no_cuda", lambda rows_path, run: False)  # part 1 "found" a GPU
    check.schedule(check.PARTS, 480.0, 480.0, tmp_path / "rows.jsonl", "run", False, runner)
    assert started[:6] == [1, 2, 3, 4, 5, 6]
