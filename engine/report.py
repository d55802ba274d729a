"""A finished profile: stage records, run notes and memory samples, plus the ways to read them.

Why a separate, frozen object: the profiler keeps mutating while a render runs; a `Report` is what
a render hands back and what gets saved, loaded and compared, so it must not change under the
reader. Everything in it is JSON-native already (the profiler converts at snapshot time), which is
what makes `Report.from_dict(json.loads(report.to_json())) == report` hold exactly.

Units: times in seconds since the profiler was created, memory in bytes (None where not measured,
e.g. VRAM on CPU). Tables and charts show GB = 1e9 bytes, the unit SPEC section 5 uses.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

from threedis.engine.errors import UserError

if TYPE_CHECKING:  # PIL is only needed to draw the chart
    from PIL import Image

FORMAT = "threedis.profile"
VERSION = 1
GB = 1e9

# A trailing index after a separator marks one of a family of stages ("step 3", "block_12"),
# aggregated into one table row; "t5" or "fp8" have no separator and stay as they are.
_FAMILY = re.compile(r"[\s_#]+\d+$")


class MemorySample(NamedTuple):
    """Memory at one instant: t in seconds, VRAM allocated/reserved and host RSS in bytes."""

    t: float
    allocated: int | None
    reserved: int | None
    rss: int | None


@dataclass(frozen=True)
class StageRecord:
    """One finished `with prof.stage(...)` block.

    parent is the index of the enclosing stage in `Report.stages` (None at top level).
    wall_s comes from CUDA events on GPU, so it can differ slightly from end_s - start_s.
    Peaks cover the whole stage including nested stages; rss_peak is the highest RSS sampled
    during the stage (host RSS has no resettable peak counter).
    """

    name: str
    info: dict[str, Any]
    depth: int
    parent: int | None
    start_s: float
    end_s: float
    wall_s: float
    peak_allocated: int | None
    peak_reserved: int | None
    allocated_end: int | None
    rss_end: int | None
    rss_peak: int | None


@dataclass(frozen=True)
class Report:
    """Frozen snapshot of a profiler: stages in start order, run-level notes, memory samples."""

    stages: tuple[StageRecord, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    samples: tuple[MemorySample, ...] = ()

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "info": jsonable(self.info),
            "stages": [jsonable(asdict(s)) for s in self.stages],
            "samples": [s._asdict() for s in self.samples],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Inverse of `to_dict` (e.g. a saved report.json); a wrong file raises UserError."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"not a threedis profile report: expected a JSON object with format '{FORMAT}'")
        if data.get("version") != VERSION:
            raise UserError(
                f"profile report version {data.get('version')!r} is not supported; "
                f"this threedis reads version {VERSION}: re-run the render to get a new report"
            )
        try:
            stages = tuple(StageRecord(**{**s, "info": dict(s["info"])}) for s in data["stages"])
            samples = tuple(MemorySample(**s) for s in data["samples"])
            info = dict(data["info"])
        except (KeyError, TypeError) as exc:
            raise UserError(f"profile report is damaged ({exc}); re-run the render to get a new report") from None
        return cls(stages=stages, info=info, samples=samples)

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Report:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def with_stage(self, name: str, wall_s: float, rss: int | None = None, **info: Any) -> Report:
        """A copy with one more top-level stage, placed after the last one.

        For work timed after the render returned its report, e.g. "save" (writing the image
        files) before the report itself is written.
        """
        if wall_s < 0:
            raise ValueError(f"wall_s must be >= 0, got {wall_s}")
        start = max((s.end_s for s in self.stages), default=0.0)
        record = StageRecord(name=name, info=jsonable(info), depth=0, parent=None, start_s=start,
                             end_s=start + wall_s, wall_s=wall_s, peak_allocated=None, peak_reserved=None,
                             allocated_end=None, rss_end=rss, rss_peak=rss)
        return Report(stages=(*self.stages, record), info=dict(self.info), samples=self.samples)

    # -- reading ------------------------------------------------------------------------------

    def find(self, name: str) -> list[StageRecord]:
        """All stages called `name`, in start order."""
        return [s for s in self.stages if s.name == name]

    def table(self, detail: bool = False) -> str:
        """Aligned text: notes, one row per stage family (steps aggregated), totals.

        detail=True appends every stage individually, in start order, indented by depth.
        """
        lines = ["threedis profile"]
        for key, value in self.info.items():
            lines += _info_lines(key, value, "  ")
        if not self.stages:
            return "\n".join(lines + ["", "no stages recorded"]) + "\n"
        top = [s for s in self.stages if s.parent is None]
        span = max(s.end_s for s in self.stages) - min(s.start_s for s in self.stages)
        lines.append(f"  wall span: {span:.3f} s over {len(self.stages)} stages")

        header = ("stage", "calls", "total s", "mean s", "peak alloc GB", "peak res GB", "RSS GB")
        rows = [
            (label, str(n), f"{total:.3f}", f"{total / n:.3f}", _gb(pa), _gb(pr), _gb(rss))
            for label, n, total, pa, pr, rss in self._families()
        ]
        total_row = (
            "total",
            str(len(top)),
            f"{sum(s.wall_s for s in top):.3f}",
            "",
            _gb(_max(s.peak_allocated for s in self.stages)),
            _gb(_max(s.peak_reserved for s in self.stages)),
            _gb(_max(s.rss_peak for s in self.stages)),
        )
        lines += [""] + _align(header, rows, total_row)
        if detail:
            header = ("stage (in order)", "start s", "wall s", "peak alloc GB", "peak res GB", "alloc end GB",
                      "RSS GB", "info")
            rows = [
                ("  " * s.depth + s.name, f"{s.start_s:.3f}", f"{s.wall_s:.4f}", _gb(s.peak_allocated),
                 _gb(s.peak_reserved), _gb(s.allocated_end), _gb(s.rss_peak),
                 ", ".join(f"{k}={_inline(v)}" for k, v in s.info.items()))
                for s in self.stages
            ]
            lines += [""] + _align(header, rows, None, left_last=True)
        return "\n".join(lines) + "\n"

    def _families(self) -> list[tuple[str, int, float, int | None, int | None, int | None]]:
        """Aggregate stages by their path of family names from the root, in first-seen order."""
        paths: list[tuple[str, ...]] = []
        groups: dict[tuple[str, ...], list[StageRecord]] = {}
        for s in self.stages:
            own = _FAMILY.sub("", s.name) or s.name
            path = (paths[s.parent] if s.parent is not None else ()) + (own,)
            paths.append(path)
            groups.setdefault(path, []).append(s)
        return [
            ("  " * (len(path) - 1) + path[-1], len(members), sum(m.wall_s for m in members),
             _max(m.peak_allocated for m in members), _max(m.peak_reserved for m in members),
             _max(m.rss_peak for m in members))
            for path, members in groups.items()
        ]

    def chrome_trace(self) -> dict[str, Any]:
        """Chrome trace event format (chrome://tracing, ui.perfetto.dev): X events per stage, C for memory."""
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "threedis"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "stages"}},
        ]
        for s in self.stages:
            memory = {
                "peak_allocated_GB": _gb_num(s.peak_allocated),
                "peak_reserved_GB": _gb_num(s.peak_reserved),
                "allocated_end_GB": _gb_num(s.allocated_end),
                "rss_end_GB": _gb_num(s.rss_end),
                "rss_peak_GB": _gb_num(s.rss_peak),
            }
            events.append({
                "name": s.name, "cat": "stage", "ph": "X", "pid": 1, "tid": 1,
                "ts": s.start_s * 1e6, "dur": s.wall_s * 1e6,
                "args": {**s.info, **{k: v for k, v in memory.items() if v is not None}},
            })
        for m in self.samples:
            values = {"allocated_GB": _gb_num(m.allocated), "reserved_GB": _gb_num(m.reserved),
                      "rss_GB": _gb_num(m.rss)}
            events.append({"name": "memory", "ph": "C", "pid": 1, "tid": 1, "ts": m.t * 1e6,
                           "args": {k: v for k, v in values.items() if v is not None}})
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": jsonable(self.info)}

    def memory_chart(self, size: tuple[int, int] = (900, 450)) -> Image.Image:
        """Memory over time as a PIL image (see threedis.engine.report._draw_chart)."""
        return _draw_chart(self, size)

    # -- files --------------------------------------------------------------------------------

    def save(self, out_dir: str | Path, prefix: str = "report", overwrite: bool = False) -> dict[str, Path]:
        """Write JSON, text table, Chrome trace and memory chart; returns {"json","text","trace","memory"}.

        Names: <prefix>.json, <prefix>.txt, and trace.json / memory.png for the default prefix
        ("report"), <prefix>_trace.json / <prefix>_memory.png otherwise, so several reports can
        share a folder. Existing files raise FileExistsError (nothing is written) unless overwrite.
        """
        out = Path(out_dir)
        extra = "" if prefix == "report" else f"{prefix}_"
        paths = {
            "json": out / f"{prefix}.json",
            "text": out / f"{prefix}.txt",
            "trace": out / f"{extra}trace.json",
            "memory": out / f"{extra}memory.png",
        }
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"refusing to overwrite {', '.join(existing)}: choose another folder or prefix, or pass overwrite=True"
            )
        out.mkdir(parents=True, exist_ok=True)
        paths["json"].write_text(self.to_json(), encoding="utf-8")
        paths["text"].write_text(self.table(detail=True), encoding="utf-8")
        paths["trace"].write_text(json.dumps(self.chrome_trace()), encoding="utf-8")
        self.memory_chart().save(paths["memory"], format="PNG")
        return paths


# -- helpers ------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """A JSON-native copy of value: containers copied, paths/devices/dtypes and other objects as str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d tensor / numpy scalar
        return jsonable(value.item())
    return str(value)


def _max(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _gb_num(value: int | None) -> float | None:
    return None if value is None else round(value / GB, 6)


def _gb(value: int | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


_WIDTH = 100  # header lines wrap here instead of being cut


def _inline(value: Any) -> str:
    """A JSON-native value as text a person reads: `a=1, b=[2, 3]`, not a Python repr."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_inline(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return "-" if value is None else str(value)


def _info_lines(key: str, value: Any, indent: str) -> list[str]:
    """One header note: nested objects as indented sub-lines, long text wrapped, nothing cut."""
    if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
        out = [f"{indent}{key}:"]
        for k, v in value.items():
            out += _info_lines(str(k), v, indent + "  ")
        return out
    return textwrap.wrap(f"{key}: {_inline(value)}", width=_WIDTH, initial_indent=indent,
                         subsequent_indent=indent + "    ", break_on_hyphens=False) or [f"{indent}{key}:"]


def _align(header: tuple[str, ...], rows: list[tuple[str, ...]], total: tuple[str, ...] | None,
           left_last: bool = False) -> list[str]:
    """First column (and optionally the last) left-aligned, the rest right-aligned."""
    every = [header, *rows] + ([total] if total else [])
    widths = [max(len(r[i]) for r in every) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = []
        for i, (cell, w) in enumerate(zip(row, widths)):
            left = i == 0 or (left_last and i == len(row) - 1)
            cells.append(cell.ljust(w) if left else cell.rjust(w))
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(tuple("x" * w for w in widths)))
    out = [fmt(header), rule] + [fmt(r) for r in rows]
    return out + ([rule, fmt(total)] if total else [])


# -- chart --------------------------------------------------------------------------------------

_SERIES = (  # sample field, legend label, colour
    ("allocated", "VRAM allocated", (31, 119, 180)),
    ("reserved", "VRAM reserved", (255, 127, 14)),
    ("rss", "host RSS", (44, 160, 44)),
)
_SHADES = ((236, 242, 250), (250, 244, 232))


def _nice_ticks(hi: float, target: int = 6) -> list[float]:
    """0 .. >= hi in 1/2/2.5/5 x 10^k steps."""
    hi = hi if hi > 0 else 1.0
    raw = hi / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    count = math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]


def _font(size: int):
    from PIL import ImageFont  # PIL only for the chart: reading and saving reports needs none

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def _draw_chart(report: Report, size: tuple[int, int]) -> Image.Image:
    """Lines of VRAM allocated/reserved and host RSS over time, top-level stages shaded and named."""
    from PIL import Image, ImageDraw  # PIL only for the chart (see _font)

    width, height = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    left, right, top, bottom = 64, width - 18, 40, height - 90  # plot box
    title = "memory over time"
    if "profile" in report.info:
        title += f"  (profile {report.info['profile']})"
    draw.text((left, 10), title, fill="black", font=font)

    samples = sorted(report.samples, key=lambda m: m.t)
    series = [(f, label, colour) for f, label, colour in _SERIES if any(getattr(m, f) is not None for m in samples)]
    t_end = max([m.t for m in samples] + [s.end_s for s in report.stages] + [1e-6])
    y_max = max([getattr(m, f) or 0 for m in samples for f, _, _ in series]
                + [s.peak_allocated or 0 for s in report.stages if s.parent is None] + [0]) / GB
    xticks, yticks = _nice_ticks(t_end), _nice_ticks(y_max * 1.05 if y_max > 0 else 1.0)
    x_hi, y_hi = xticks[-1], yticks[-1]

    def px(t: float) -> float:
        return left + (right - left) * t / x_hi

    def py(gb: float) -> float:
        return bottom - (bottom - top) * gb / y_hi

    # -- stage spans: shaded in the plot, named in a band under the axis, nested ones as ticks --
    band = bottom + 36
    draw.text((left - 56, band + 3), "stages", fill=(90, 90, 90), font=small)
    for i, s in enumerate(r for r in report.stages if r.parent is None):
        x0, x1 = px(s.start_s), max(px(s.end_s), px(s.start_s) + 1)
        draw.rectangle([x0, top, x1, bottom], fill=_SHADES[i % 2])
        draw.rectangle([x0, band, x1, band + 18], fill=_SHADES[i % 2], outline=(150, 150, 150))
        name = s.name
        while name and draw.textlength(name, font=small) > x1 - x0 - 4:
            name = name[:-1]
        if name:
            draw.text((x0 + 2, band + 3), name, fill=(60, 60, 60), font=small)
    for s in report.stages:
        if s.depth >= 1:
            x = px(s.start_s)
            draw.line([x, band + 20, x, band + 26 + 4 * min(s.depth - 1, 2)], fill=(120, 120, 120))

    # -- grid, axes, ticks --
    for v in yticks:
        y = py(v)
        draw.line([left, y, right, y], fill=(225, 225, 225))
        label = f"{v:g}"
        draw.text((left - 6 - draw.textlength(label, font=small), y - 6), label, fill="black", font=small)
    for v in xticks:
        x = px(v)
        draw.line([x, bottom, x, bottom + 4], fill="black")
        label = f"{v:g}"
        draw.text((x - draw.textlength(label, font=small) / 2, bottom + 6), label, fill="black", font=small)
    draw.line([left, top, left, bottom], fill="black")
    draw.line([left, bottom, right, bottom], fill="black")
    draw.text((left - 40, top - 18), "GB", fill="black", font=small)
    draw.text((right - draw.textlength("time (s)", font=small), bottom + 20), "time (s)", fill="black", font=small)

    # -- lines --
    for f, _, colour in series:
        points = [(px(m.t), py(getattr(m, f) / GB)) for m in samples if getattr(m, f) is not None]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        elif points:
            draw.line(points, fill=colour, width=2)
    if not samples:
        draw.text((left + 10, top + 10), "no memory samples", fill=(120, 120, 120), font=font)
    # Samples are instants; a stage's true VRAM peak (from the peak counters) is dotted over its span.
    peaks = [s for s in report.stages if s.parent is None and s.peak_allocated is not None]
    for s in peaks:
        y = py(s.peak_allocated / GB)
        for x in range(int(px(s.start_s)), int(px(s.end_s)), 6):
            draw.line([x, y, min(x + 3, px(s.end_s)), y], fill=_SERIES[0][2], width=2)

    # -- legend, top right --
    x = right
    if peaks:
        x -= draw.textlength("stage peak alloc", font=small) + 28
        for dx in (0, 7, 14):
            draw.line([x + dx, 18, x + dx + 3, 18], fill=_SERIES[0][2], width=3)
        draw.text((x + 22, 11), "stage peak alloc", fill="black", font=small)
    for _, label, colour in reversed(series):
        x -= draw.textlength(label, font=small) + 28
        draw.line([x, 18, x + 18, 18], fill=colour, width=3)
        draw.text((x + 22, 11), label, fill="black", font=small)
    return img
