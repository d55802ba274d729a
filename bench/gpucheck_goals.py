"""The GPU check's goal table: each goal the project holds itself to, marked met / missed / not measured.

Why a module of its own: the table is read off the rows file alone, so a run cut off by
its time limit, or rows committed months ago, give the same table; and it is plain
Python over dicts, testable without torch or a GPU. Only rows measured on CUDA count:
a CPU dry run's rows check that the code runs, not how fast or how big it is on a card.
The goals are those of bench/README.md ("What good numbers look like").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

MET, MISSED, NOT_MEASURED, MEASURED = "met", "missed", "not measured", "measured"

# Part names, as the check writes them in each row's "part".
ENV, TESTS, KERNELS, ATTENTION, RENDERS, STAGE1, EVAL = (
    "environment", "cuda-tests", "kernel-correctness", "attention-bench", "renders", "stage1-sam2", "eval-mig")
GOAL_CASE = "1024x1024-n9"  # the shape the memory goals are written for


@dataclass(frozen=True)
class Outcome:
    """One line of the table."""

    goal: str
    result: str
    value: str = ""
    detail: str = ""

    def as_row(self) -> dict[str, str]:
        return {"goal": self.goal, "result": self.result, "value": self.value, "detail": self.detail}


def _cuda(rows: Iterable[dict[str, Any]], part: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("part") == part and r.get("device_type") == "cuda"]


def _why_not(rows: Sequence[dict[str, Any]], part: str, what: str = "") -> str:
    """Why a goal has no CUDA measurement: its own not-measured row, the whole part's, a failure, a CPU run."""
    mine = [r for r in rows if r.get("part") == part]
    skipped = [r for r in mine if r.get("status") == NOT_MEASURED]
    specific = [r for r in skipped if what and what in f"{r.get('what', '')} {r.get('label', '')}"]
    whole = [r for r in skipped if r.get("what") == part]  # the part itself skipped or cut off
    for group in (specific, whole):
        if group:
            return str(group[0].get("why", ""))
    errors = [r for r in mine if r.get("status") == "error"]
    if errors:
        return f"failed: {errors[0].get('error', '')}"
    if any(r.get("device_type") == "cpu" for r in mine) and not any(r.get("device_type") == "cuda" for r in mine):
        return "measured on the CPU only (a dry run): no GPU figures"
    if skipped:
        return str(skipped[0].get("why", ""))
    return f"part {part} did not run" if not mine else "no row for it"


def _fmt(x: float, spec: str = ".3g") -> str:
    return format(x, spec)


# -- attention ------------------------------------------------------------------------------

def _attention(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """(case, phase) -> backend -> its timed row (CUDA only)."""
    out: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in _cuda(rows, ATTENTION):
        if r.get("status") == "ok" and r.get("p50_ms") is not None:
            out.setdefault((r["case"], r["phase"]), {})[r["backend"]] = r
    return out


def _attention_failures(rows: Sequence[dict[str, Any]], backend: str) -> list[dict[str, Any]]:
    return [r for r in _cuda(rows, ATTENTION) if r.get("backend") == backend and r.get("status") == "error"]


def _ratio_goal(rows: Sequence[dict[str, Any]], goal: str, value: Callable[[dict[str, dict[str, Any]]], float | None],
                ok: Callable[[float], bool], worst: Callable[[Iterable[tuple[float, str]]], tuple[float, str]],
                unit: str) -> Outcome:
    """A goal over every (case, phase) of the attention bench: all must pass; the table shows the worst."""
    found = [(v, f"{case} {phase}") for (case, phase), by in _attention(rows).items()
             if (v := value(by)) is not None]
    failed = _attention_failures(rows, "triton")
    if failed:
        return Outcome(goal, MISSED, "", f"the kernel failed on {failed[0]['case']} {failed[0]['phase']}: "
                                         f"{failed[0].get('error', '')}")
    if not found:
        return Outcome(goal, NOT_MEASURED, "", _why_not(rows, ATTENTION))
    v, where = worst(found)
    passing = all(ok(x) for x, _ in found)
    return Outcome(goal, MET if passing else MISSED, f"{_fmt(v)}{unit}", f"worst at {where}, {len(found)} cases")


def _triton_vs(other: str) -> Callable[[dict[str, dict[str, Any]]], float | None]:
    def speedup(by: dict[str, dict[str, Any]]) -> float | None:
        if "triton" not in by or other not in by:
            return None
        return by[other]["p50_ms"] / by["triton"]["p50_ms"]
    return speedup


def _vs_tile_fraction(by: dict[str, dict[str, Any]]) -> float | None:
    row = by.get("triton")
    if row is None or row.get("ratio_to_flash") is None or not row.get("tile_fraction"):
        return None
    return row["ratio_to_flash"] / row["tile_fraction"]


def _vs_flash(by: dict[str, dict[str, Any]]) -> float | None:
    row = by.get("triton")
    return None if row is None else row.get("ratio_to_flash")


def _extra_memory(rows: Sequence[dict[str, Any]]) -> Outcome:
    goal = f"kernel extra memory < 1 MB at {GOAL_CASE}"
    found = [r for r in _cuda(rows, ATTENTION)
             if r.get("backend") == "triton" and r.get("case") == GOAL_CASE and r.get("extra_mem_bytes") is not None]
    if not found:
        return Outcome(goal, NOT_MEASURED, "", _why_not(rows, ATTENTION))
    worst = max(found, key=lambda r: r["extra_mem_bytes"])
    met = worst["extra_mem_bytes"] < 1e6
    return Outcome(goal, MET if met else MISSED, f"{worst['extra_mem_bytes'] / 1e6:.3f} MB",
                   f"worst phase {worst['phase']} (beyond q/k/v/out, tables included)")


# -- renders ----------------------------------------------------------------------------------

def _render(rows: Sequence[dict[str, Any]], label: str) -> dict[str, Any] | None:
    found = [r for r in _cuda(rows, RENDERS) if r.get("label") == label and r.get("status") != NOT_MEASURED]
    return found[-1] if found else None


def _peak_goal(rows: Sequence[dict[str, Any]], profile: str, cap_gb: int) -> Outcome:
    label = f"{profile}-n9"
    goal = f"{profile} peak <= {cap_gb} GiB at 1024^2, 9 instances"  # a "12 GB" card has 12288 MiB
    row = _render(rows, label)
    if row is None:
        return Outcome(goal, NOT_MEASURED, "", _why_not(rows, RENDERS, label))
    if row.get("render_status") != "ok":
        return Outcome(goal, MISSED, "did not render", f"under a {cap_gb} GiB cap: {row.get('render_status')}")
    peak = row.get("measured_peak_device_gb")
    if peak is None:
        return Outcome(goal, NOT_MEASURED, "", "no peak in the row")
    return Outcome(goal, MET if peak <= cap_gb else MISSED, f"{peak:.2f} GiB",
                   f"reserved {row.get('peak_reserved_gb')} GiB + outside the allocator "
                   f"{row.get('outside_allocator_gb')} GiB; planned {row.get('planned_peak_gpu_gb')} GiB")


def _computed_p50(row: dict[str, Any]) -> float | None:
    steps = row.get("s_per_computed_step") or row.get("s_per_step") or {}
    return steps.get("p50")


def _offload_goal(rows: Sequence[dict[str, Any]]) -> Outcome:
    goal = "12gb s/step <= 1.25x the resident baseline (1024^2, 9 instances)"
    capped, resident = _render(rows, "12gb-n9"), _render(rows, "resident-n9")
    missing = [label for label, r in (("12gb-n9", capped), ("resident-n9", resident))
               if r is None or r.get("render_status") != "ok" or _computed_p50(r) is None]
    if missing:
        why = "; ".join(_why_not(rows, RENDERS, m) if _render(rows, m) is None
                        else f"{m}: {_render(rows, m).get('render_status')}" for m in missing)
        return Outcome(goal, NOT_MEASURED, "", why)
    ratio = _computed_p50(capped) / _computed_p50(resident)
    return Outcome(goal, MET if ratio <= 1.25 else MISSED, f"{ratio:.2f}x",
                   f"{_computed_p50(capped):.3f} s vs {_computed_p50(resident):.3f} s per computed step")


def _planner_goal(rows: Sequence[dict[str, Any]]) -> Outcome:
    goal = "planner within 10% of the measured peak"
    found = [r for r in _cuda(rows, RENDERS) if r.get("render_status") == "ok" and r.get("plan_vs_measured")]
    if not found:
        return Outcome(goal, NOT_MEASURED, "", _why_not(rows, RENDERS))
    worst = max(found, key=lambda r: abs(r["plan_vs_measured"] - 1))
    met = all(abs(r["plan_vs_measured"] - 1) <= 0.10 for r in found)
    return Outcome(goal, MET if met else MISSED, f"plan/measured {worst['plan_vs_measured']:.3f}",
                   f"worst of {len(found)} rows: {worst.get('label')}")


# -- checks beyond the goals ------------------------------------------------------------------------

def _correctness(rows: Sequence[dict[str, Any]]) -> Outcome:
    goal = "Triton and FlexAttention match the fp32 reference (real shapes, 15 phase sets, bf16/fp16)"
    found = [r for r in _cuda(rows, KERNELS) if r.get("backend") in ("triton", "flex")]
    if not found:
        return Outcome(goal, NOT_MEASURED, "", _why_not(rows, KERNELS))
    bad = [r for r in found if r.get("status") != "ok"]
    detail = f"{len(found) - len(bad)} of {len(found)} pass"
    if bad:
        first = bad[0]
        detail += (f"; first failure {first.get('backend')} {first.get('case')} {first.get('dtype')} "
                   f"{first.get('phases')}: {first.get('error') or first.get('max_abs_err')}")
    worst = max((r for r in found if r.get("rel_err") is not None), key=lambda r: r["rel_err"], default=None)
    value = "" if worst is None else f"worst rel. error {worst['rel_err']:.2e} ({worst['backend']} {worst['dtype']})"
    return Outcome(goal, MISSED if bad else MET, value, detail)


def _tests(rows: Sequence[dict[str, Any]]) -> Outcome:
    goal = "CUDA tests pass"
    found = [r for r in _cuda(rows, TESTS) if r.get("status") in ("ok", "failed")]
    if not found:
        return Outcome(goal, NOT_MEASURED, "", _why_not(rows, TESTS))
    passed = sum(r.get("passed", 0) for r in found)
    failed = sum(r.get("failed", 0) + r.get("errors", 0) for r in found)
    names = [n for r in found for n in r.get("failures", [])][:3]
    cut = [r["what"] for r in found if r.get("timed_out")]
    result = MISSED if failed or cut else MET
    detail = "; ".join(names) + (f"; cut at the time limit: {', '.join(cut)}" if cut else "")
    return Outcome(goal, result, f"{passed} passed, {failed} failed", detail)


def _stage1_precision(rows: Sequence[dict[str, Any]]) -> Outcome:
    goal = "stage 1 fp16 vs fp32 depth (same weights, seed, layout)"
    found = [r for r in _cuda(rows, STAGE1) if r.get("what") == "stage1 fp16 vs fp32" and r.get("status") == "ok"]
    if not found:
        return Outcome(goal, NOT_MEASURED, "", _why_not(rows, STAGE1, "stage1"))
    r = found[-1]
    return Outcome(goal, MEASURED, f"mean |diff| {r['depth_mean_abs']:.4f}, max {r['depth_max_abs']:.4f}",
                   f"8-bit levels: max {r['depth_levels_max']}, {r['depth_levels_over1_fraction']:.2%} of pixels "
                   f"off by more than 1 (random real-size weights, not the release's)")


def _eval_mig(rows: Sequence[dict[str, Any]]) -> Outcome:
    """Issue 18: 800 images x 4 seeds "should take minutes, not hours": under an hour on one GPU."""
    goal = "eval mig: 800 prompts x 4 seeds in under an hour on one GPU (fp32)"
    found = [r for r in _cuda(rows, EVAL) if r.get("what") == "eval mig" and r.get("status") == "ok"]
    if not found:
        return Outcome(goal, NOT_MEASURED, "", _why_not(rows, EVAL, "eval mig"))
    r = found[-1]
    minutes = r["minutes_for_800x4"]
    return Outcome(goal, MET if minutes < 60 else MISSED, f"{minutes:.1f} min",
                   f"{r['s_per_image'] * 1000:.0f} ms/image (detector {r['detector_s_per_image'] * 1000:.0f}, SAM "
                   f"{r['sam_s_per_image'] * 1000:.0f}), peak {r.get('peak_allocated_gb')} GB, {r['images']} images; "
                   f"random real-size weights, SAM on every instance")


def evaluate(rows: Sequence[dict[str, Any]]) -> list[Outcome]:
    """The table, goals first (bench/README.md), then the checks the goals rest on."""
    less = lambda found: max(found)  # noqa: E731 - the worst of ratios that should be small
    more = lambda found: min(found)  # noqa: E731 - the worst of speed-ups that should be large
    return [
        _ratio_goal(rows, "kernel <= 1.15x (tile fraction x flash)", _vs_tile_fraction, lambda x: x <= 1.15, less,
                    "x"),
        _ratio_goal(rows, "kernel never slower than flash", _vs_flash, lambda x: x <= 1.0, less, "x flash"),
        _ratio_goal(rows, "kernel >= 1.2x faster than FlexAttention (same order and tiles)", _triton_vs("flex"),
                    lambda x: x >= 1.2, more, "x"),
        _ratio_goal(rows, "kernel >= 3x faster than dense-mask SDPA", _triton_vs("sdpa"), lambda x: x >= 3.0, more,
                    "x"),
        _extra_memory(rows),
        _peak_goal(rows, "12gb", 12),
        _peak_goal(rows, "8gb", 8),
        _offload_goal(rows),
        _planner_goal(rows),
        _correctness(rows),
        _tests(rows),
        _stage1_precision(rows),
        _eval_mig(rows),
    ]


def markdown(outcomes: Sequence[Outcome], title: str) -> str:
    """The table as Markdown (bench/README.md and the check's output folder)."""
    lines = [f"### {title}", "", "| goal | result | value | detail |", "| --- | --- | --- | --- |"]
    for o in outcomes:
        cells = (o.goal, f"**{o.result}**" if o.result == MISSED else o.result, o.value, o.detail)
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    counts = {k: sum(o.result == k for o in outcomes) for k in (MET, MISSED, NOT_MEASURED)}
    lines += ["", f"{counts[MET]} met, {counts[MISSED]} missed, {counts[NOT_MEASURED]} not measured"]
    return "\n".join(lines) + "\n"
