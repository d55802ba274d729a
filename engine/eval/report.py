"""The evaluation's results: a JSON document and the table printed beside the published numbers.

Rates are computed per seed and over all seeds pooled. The table shows the mean
over seeds (the pooled value when there is one seed) with the seeds' standard
deviation under it; the JSON has every count, per level and overall, per seed,
pooled, and the spread, plus every item that could not be evaluated and why.
"""

from __future__ import annotations

from typing import Any, Mapping

from threedis.engine.eval import protocol
from threedis.engine.eval.score import InstanceMeasure, Scores, judge, spread
from threedis.engine.eval.sources import Source


def build_report(source: Source, results: Mapping[str, list[InstanceMeasure] | str],
                 models: Mapping[str, str]) -> dict[str, Any]:
    """The JSON document of `threedis eval mig --out`."""
    per_seed: dict[str, Scores] = {}
    pooled = Scores()
    counts = {"expected": 0, "evaluated": 0, "failed": 0, "missing": 0, "unreadable": 0}
    not_evaluated = []
    for item in source.items:
        result = results.get(item.name) if item.status == "done" else None
        verdicts = [judge(m) for m in result] if isinstance(result, list) else None
        counts["expected"] += 1
        if verdicts is not None:
            counts["evaluated"] += 1
        else:
            status = "unreadable" if item.status == "done" else item.status
            counts[status] += 1
            why = result if isinstance(result, str) else (item.note or "not scored")
            not_evaluated.append({"item": item.name, "status": status, "why": why})
        per_seed.setdefault(item.group, Scores()).add_image(item.truth.level, verdicts)
        pooled.add_image(item.truth.level, verdicts)
    return {
        "benchmark": "COCO-MIG",
        "protocol": protocol.settings(),
        "source": {"kind": source.kind, "path": str(source.path), "truth": source.truth_from, **models},
        "items": counts,
        "seeds": sorted(per_seed),
        "pooled": pooled.to_dict(),
        "per_seed": {seed: scores.to_dict() for seed, scores in per_seed.items()},
        "mean_over_seeds": spread(per_seed),
        "published": [dict(row) for row in protocol.PUBLISHED],
        "notes": list(source.notes),
        "not_evaluated": not_evaluated,
    }


_PUBLISHED_COLUMNS = [f"L{n}" for n in protocol.LEVELS]


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _row(label: str, values: list[str]) -> str:
    return f"{label:<30}" + "".join(f"{v:>7}" for v in values)


def _columns(pooled: Mapping[str, Any]) -> list[str]:
    """L2..L6 always (the published table's), then any other level the prompts have, by instance count."""
    extra = sorted((k for k in pooled if k not in _PUBLISHED_COLUMNS and k != "overall"), key=lambda k: int(k[1:]))
    return [*_PUBLISHED_COLUMNS, *extra]


def table(report: Mapping[str, Any]) -> str:
    """The human-readable table: per level and overall, mean over seeds, spread, published rows."""
    pooled, mean = report["pooled"], report["mean_over_seeds"]
    columns = _columns(pooled)
    keys = [*columns, "overall"]
    seeds = report["seeds"]
    counts = report["items"]
    several = len(seeds) > 1

    def counted(field: str) -> list[str]:
        return [str(pooled[k][field]) if k in pooled else "-" for k in keys]

    def rate(name: str, stat: str) -> list[str]:
        return [_pct(mean.get(k, {}).get(name, {}).get(stat)) for k in keys]

    lines = [f"COCO-MIG, protocol of {report['protocol']['reference']}: {report['source']['path']}",
             f"images: {counts['expected']} expected over {len(seeds)} seed(s), {counts['evaluated']} evaluated, "
             f"{counts['failed']} failed, {counts['missing']} missing, {counts['unreadable']} unreadable"]
    if counts["evaluated"] < counts["expected"]:
        lines.append("  instances of images not evaluated count as failures with IoU 0; the JSON lists those images "
                     "and has *_evaluated rates over the evaluated ones")
    heading = f"percent, mean of {len(seeds)} seeds" if several else "percent"
    lines += ["", _row(heading, [*columns, "all"]), _row("instances", counted("instances")),
              _row("  evaluated", counted("evaluated"))]
    for name, label in (("instance_success", "instance success"), ("miou", "mIoU"),
                        ("image_success", "image success")):
        lines.append(_row(label, rate(name, "mean")))
        if several:
            lines.append(_row("  std over seeds", rate(name, "std")))
    pad = ["-"] * (len(columns) - len(_PUBLISHED_COLUMNS))
    lines += ["", "published:"]
    for name, label in (("instance_success", "instance success"), ("miou", "mIoU")):
        for row in report["published"]:
            values = ["-" if v is None else f"{v:.1f}" for v in row[name]]
            lines.append(_row(f"  {row['method']}", [*values[:-1], *pad, values[-1]]) + f"   {label}")
    for row in report["published"]:
        if row.get("image_success") is not None:
            lines.append(_row(f"  {row['method']}", ["-"] * len(columns) + [f"{row['image_success']:.1f}"])
                         + "   image success")
    if report["notes"]:
        lines += ["", *(f"note: {note}" for note in report["notes"])]
    return "\n".join(lines)
