"""The GPU check: one prepared command that measures what the engine exists for, whenever a GPU is lent.

Usage:
  python bench/gpu_check.py --out DIR [--budget-s 480] [--parts 1,3,4] [--dry-run]

Runs, in this order of value, each part in a fresh process (a crash, a dead CUDA context
or a memory cap stays inside its part; this process never touches CUDA, so it holds no
memory on the card) and each only when its estimated time still fits the budget; a part
that does not fit, or a measurement inside one, is written as a row "not measured" with
the reason:
  1 environment         GPU, compute capability, memory, driver, versions, kernel configs, ceilings
  2 cuda-tests          pytest -m gpu, and the test modules that use CUDA when present
  3 kernel-correctness  Triton and FlexAttention vs a float32 reference at the real shapes
  4 attention-bench     flash / Triton / compiled FlexAttention / dense-mask SDPA times and memory
  5 renders             12gb under 12 GB, resident baseline, 8gb under 8 GB, 16gb under 16 GB
  6 stage1-sam2         stage 1 fp32 and fp16 (their depth difference) and SAM2: time and memory
  7 eval-mig            `threedis eval mig` with real-size random-weight Grounding DINO + SAM ViT-H, fp32:
                        s/image, images/s, peak VRAM, minutes for 800 prompts x 4 seeds

Every measurement is one JSON line appended (and flushed) to DIR/gpu-<gpu>-<date>.jsonl the
moment it is made, with the device and versions in it, so a run cut off by its time limit
keeps every finished row. The run ends with a goal table (met / missed / not measured),
printed last and written to DIR/goals-<gpu>-<date>.md; pytest's output goes to
DIR/pytest-<gpu>-<date>.txt. Three files: the device tool brings back at most eight.
--dry-run runs every part on the CPU at tiny sizes (tiny checkpoints, small attention
shapes), all in one process (one import of torch and diffusers), and marks the GPU
measurements not measured: it is a test of the check itself (tests/test_gpu_check.py).
A run on a machine without CUDA and without --dry-run stops after part 1 with exit code 2.
This file imports no torch: the parts do, in their own processes (bench/gpucheck_*.py).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import faulthandler
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from gpucheck_goals import ATTENTION, ENV, EVAL, KERNELS, RENDERS, STAGE1, TESTS, evaluate, markdown
from gpucheck_env import nvidia_smi
from gpucheck_rows import Clock, Rows, first_line, read_rows

ROOT = Path(__file__).resolve().parents[1]
_GRACE_S = 30  # a part past its deadline gets this long to finish its current row before it is killed


@dataclass(frozen=True)
class Part:
    """One part: where its code is, what it is likely to take, and the most it may take."""

    number: int
    name: str
    module: str
    function: str
    estimate_s: float  # on the H200, before it starts (the dry run's is dry_estimate_s)
    dry_estimate_s: float
    cap_s: float | None  # cut after this long, whatever time is left
    reserved: bool = True  # the parts before it leave it its estimate (False: it runs on what is left)

    def estimate(self, dry: bool) -> float:
        return self.dry_estimate_s if dry else self.estimate_s


PARTS: tuple[Part, ...] = (
    Part(1, ENV, "gpucheck_env", "environment", 25, 10, 60),
    Part(2, TESTS, "gpucheck_env", "cuda_tests", 120, 25, 170),
    Part(3, KERNELS, "gpucheck_kernels", "kernel_correctness", 60, 15, 120),
    Part(4, ATTENTION, "gpucheck_kernels", "attention_bench", 60, 10, 100),
    Part(5, RENDERS, "gpucheck_models", "renders", 90, 30, None),
    Part(6, STAGE1, "gpucheck_models", "stage1_sam2", 45, 15, None),
    Part(7, EVAL, "gpucheck_eval", "eval_mig", 75, 5, 150, reserved=False),  # the least valuable: on what is left
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unknown"


def gpu_slug(dry: bool) -> str:
    """The card's name for file names, from nvidia-smi (no CUDA context here); "cpu-dry-run" for a dry run."""
    if dry:
        return "cpu-dry-run"
    name = (nvidia_smi() or {}).get("name", "")
    return _slug(name.removeprefix("NVIDIA ")) if name else "unknown-gpu"


@dataclass
class Context:
    """What a part's process gets: where to write, how long it has, which device."""

    rows: Rows
    clock: Clock
    dry: bool
    device: Any  # torch.device
    root: Path
    out: Path
    scratch: Path
    stem: str  # "<gpu>-<date>": the output files' common part

    def log_name(self, prefix: str, ext: str) -> str:
        return f"{prefix}-{self.stem}.{ext}"


def _select(text: str | None) -> list[Part]:
    if not text:
        return list(PARTS)
    wanted = {w.strip() for w in text.split(",") if w.strip()}
    chosen = [p for p in PARTS if str(p.number) in wanted or p.name in wanted]
    unknown = wanted - {str(p.number) for p in chosen} - {p.name for p in chosen}
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; choose numbers 1-{len(PARTS)} or "
                         f"{', '.join(p.name for p in PARTS)}")
    return [PARTS[0], *[p for p in chosen if p.number != 1]]  # the environment always: every row names the card


def schedule(parts: Sequence[Part], deadline: float, budget_s: float, rows_path: Path, run: str, dry: bool,
             runner: Callable[[Part, float], None]) -> bool:
    """Run the parts in order, each only when its estimate fits; False when a GPU run finds no CUDA."""
    for i, part in enumerate(parts):
        keep = sum(p.estimate(dry) for p in parts[i + 1:] if p.reserved)  # a part that runs long eats slack only
        left = deadline - time.time() - keep
        estimate = part.estimate(dry)
        if left < estimate:
            print(f"[{part.number} {part.name}] not started: needs ~{estimate:.0f} s, {left:.0f} s left", flush=True)
            Rows(rows_path, part.name, "unknown", run).not_measured(
                part.name, f"budget: needs ~{estimate:.0f} s, {left:.0f} s of {budget_s:.0f} s left"
                           + (f" (keeping {keep:.0f} s for the parts after it)" if keep else ""))
            continue
        part_deadline = deadline - keep
        if part.cap_s is not None:
            part_deadline = min(part_deadline, time.time() + part.cap_s)
        print(f"[{part.number} {part.name}] started: estimate ~{estimate:.0f} s, "
              f"{part_deadline - time.time():.0f} s allowed", flush=True)
        start = time.time()
        runner(part, part_deadline)
        print(f"[{part.number} {part.name}] done in {time.time() - start:.0f} s", flush=True)
        if part.number == 1 and not dry and _no_cuda(rows_path, run):
            return False
    return True


def run_child(names: str, rows_path: Path, deadline: float, budget_s: float, dry: bool, run: str, out: Path,
              stem: str) -> int:
    """Inside a part's process (a GPU run: one part) or the dry run's single process (every part, scheduled
    here: one import of torch and diffusers instead of one a part). Imports torch after fixing the environment."""
    faulthandler.enable()  # a segfault in a native library still leaves its Python stack in the log
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; never wait on a network
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: the kernel on CPU tensors
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # a GPU run measures the compiled kernel
    import importlib

    import torch

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    failed = []

    def run_part(part: Part, part_deadline: float) -> None:
        rows = Rows(rows_path, part.name, "cuda" if cuda else "cpu", run)
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
            ctx = Context(rows, Clock(part_deadline), dry, device, ROOT, out, Path(scratch), stem)
            try:
                getattr(importlib.import_module(part.module), part.function)(ctx)
            except Exception as exc:  # noqa: BLE001 - the part's own failure is a row; the next part still runs
                traceback.print_exc()
                rows.emit(part.name, "error", error=first_line(exc))
                failed.append(part.name)

    parts = [p for p in PARTS if p.name in names.split(",")]
    if len(parts) == 1:
        run_part(parts[0], deadline)
    else:
        schedule(parts, deadline, budget_s, rows_path, run, dry, run_part)
    return 1 if failed else 0


def _spawn(parts: Sequence[Part], args: argparse.Namespace, rows_path: Path, deadline: float, run: str,
           stem: str) -> None:
    """Run parts in a fresh process; a crash, or a kill at the deadline, becomes a row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", ",".join(p.name for p in parts),
           "--rows", str(rows_path), "--deadline", repr(deadline), "--budget-s", repr(args.budget_s), "--run", run,
           "--out", str(args.out), "--stem", stem]
    if args.dry_run:
        cmd.append("--dry-run")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    name = parts[0].name if len(parts) == 1 else "gpu-check"
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.time() + _GRACE_S))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        Rows(rows_path, name, "unknown", run).not_measured(
            name, f"cut at its deadline after {time.time() - start:.0f} s; its finished rows are kept")
        return
    wrote = any(r.get("run") == run and r.get("what") in {p.name for p in parts} and r.get("status") == "error"
                for r in read_rows(rows_path))
    if code != 0 and not wrote:  # it died before it could say why (a crash, a failed import)
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        Rows(rows_path, name, "unknown", run).emit(
            name, "error", error=f"the process ended with {how} (its traceback, if any, is in the log)")


def _no_cuda(rows_path: Path, run: str) -> bool:
    env = [r for r in read_rows(rows_path) if r.get("what") == "environment" and r.get("run") == run]
    return bool(env) and not env[-1].get("cuda")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the rows, the goal table and the logs")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for the whole check (default 480): no part starts that would exceed it")
    parser.add_argument("--parts", default=None, help="comma list of part numbers or names to (re)run "
                        "(default: all; the environment always runs)")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes")
    parser.add_argument("--table-only", action="store_true", help="run nothing: the goal table again from the "
                        "rows already in --out (a run cut off before its table; any machine)")
    for hidden in ("--child", "--rows", "--deadline", "--run", "--stem"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child, Path(args.rows), float(args.deadline), args.budget_s, args.dry_run, args.run,
                         args.out, args.stem)

    begin = time.time()
    if args.table_only:
        found = sorted(args.out.glob("gpu-*.jsonl"))
        if len(found) != 1:
            print(f"gpu_check: error: --table-only needs one gpu-*.jsonl in {args.out}, found {len(found)}",
                  file=sys.stderr)
            return 2
        run = "table-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return finish(found[0], args.out, found[0].stem.removeprefix("gpu-"), run, begin)
    deadline = begin + args.budget_s
    try:
        parts = _select(args.parts)
    except ValueError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    args.out = args.out.resolve()  # the parts run from the checkout root
    args.out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    run, stem = now.strftime("%Y%m%dT%H%M%SZ"), f"{gpu_slug(args.dry_run)}-{now.strftime('%Y%m%d')}"
    rows_path = args.out / f"gpu-{stem}.jsonl"
    print(f"gpu check {run}: rows to {rows_path}, budget {args.budget_s:.0f} s"
          f"{' (dry run on the CPU)' if args.dry_run else ''}", flush=True)
    if args.dry_run:  # one process for every part: the code paths are checked, not isolated
        _spawn(parts, args, rows_path, deadline, run, stem)
    elif not schedule(parts, deadline, args.budget_s, rows_path, run, False,
                      lambda part, part_deadline: _spawn([part], args, rows_path, part_deadline, run, stem)):
        print("gpu_check: error: no CUDA device here; run with --dry-run to check the code on this CPU",
              file=sys.stderr)
        return 2
    return finish(rows_path, args.out, stem, run, begin)


def finish(rows_path: Path, out: Path, stem: str, run: str, begin: float) -> int:
    """Evaluate the goals on the rows, write them (table file and rows), print the table last."""
    rows = read_rows(rows_path)
    outcomes = evaluate(latest_runs(rows))
    title = f"GPU check {stem} (run {run}, {time.time() - begin:.0f} s)"
    table = markdown(outcomes, title)
    (out / f"goals-{stem}.md").write_text(table, encoding="utf-8")
    goal_rows = Rows(rows_path, "goals", "n/a", run)
    for outcome in outcomes:
        goal_rows.emit("goal", outcome.result, **outcome.as_row())
    print("\n" + table, flush=True)
    return 0


def latest_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per part, the rows of the latest run that measured it (a `--parts` rerun replaces that part's rows)."""
    latest: dict[str, str] = {}
    for row in rows:
        if row.get("part") != "goals":
            latest[row["part"]] = max(latest.get(row["part"], ""), str(row.get("run", "")))
    return [r for r in rows if r.get("part") != "goals" and str(r.get("run", "")) == latest.get(r.get("part"))]


if __name__ == "__main__":
    sys.exit(main())
