"""Profiler and Report: what gets recorded, how it reads, how it is saved and loaded.

References are independent of the code under test: expected names/counts written out here, RSS read
straight from /proc, the trace re-parsed with json, the PNG re-opened with PIL.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from threedis.engine.errors import UserError
from threedis.engine.profiler import MemorySample, Profiler, Report, StageRecord

MB = 1 << 20


def _render_like(prof: Profiler, steps: int = 3) -> None:
    """The shape of a render: top-level stages, a denoise stage holding numbered steps."""
    prof.note("attention_backend", "flex")
    prof.note("attention_reason", "CPU: flex attention available")
    prof.note("tile_fraction", 0.25)
    with prof.stage("load", what="transformer"):
        sum(range(1000))
    with prof.stage("denoise"):
        for i in range(steps):
            with prof.stage(f"step {i}", step=i, backend="flex"):
                prof.sample_memory()
    with prof.stage("decode"):
        pass


@pytest.fixture()
def report() -> Report:
    prof = Profiler(device="cpu")
    _render_like(prof)
    return prof.report()


def test_stages_in_order_with_times_and_nesting(report: Report) -> None:
    names = [s.name for s in report.stages]
    assert names == ["load", "denoise", "step 0", "step 1", "step 2", "decode"]
    by_name = {s.name: i for i, s in enumerate(report.stages)}
    for s in report.stages:
        assert s.wall_s > 0 and s.end_s >= s.start_s >= 0
        assert s.wall_s == pytest.approx(s.end_s - s.start_s)  # CPU: perf_counter both ways
        assert s.peak_allocated is None and s.peak_reserved is None and s.allocated_end is None  # no VRAM on CPU
        assert s.rss_end > 0 and s.rss_peak >= s.rss_end
    for i in range(3):
        step = report.stages[by_name[f"step {i}"]]
        assert step.depth == 1 and step.parent == by_name["denoise"]
        assert step.info == {"step": i, "backend": "flex"}
        parent = report.stages[step.parent]
        assert parent.start_s <= step.start_s and step.end_s <= parent.end_s
    for name in ("load", "denoise", "decode"):
        assert report.stages[by_name[name]].depth == 0 and report.stages[by_name[name]].parent is None
    tops = [s for s in report.stages if s.parent is None]
    assert all(a.end_s <= b.start_s for a, b in zip(tops, tops[1:]))  # sequential, not overlapping
    assert report.stages[0].info == {"what": "transformer"}


def test_samples_cover_stage_boundaries(report: Report) -> None:
    # Two samples per stage plus one per sample_memory() call, in time order.
    assert len(report.samples) == 2 * len(report.stages) + 3
    times = [m.t for m in report.samples]
    assert times == sorted(times)
    assert all(isinstance(m, MemorySample) and m.allocated is None and m.rss > 0 for m in report.samples)


def test_notes_present(report: Report) -> None:
    assert report.info["attention_backend"] == "flex"
    assert report.info["attention_reason"] == "CPU: flex attention available"
    assert report.info["tile_fraction"] == 0.25
    assert report.info["device"] == "cpu"
    assert report.info["torch"] == torch.__version__


def test_table_aggregates_steps(report: Report) -> None:
    text = report.table()
    for name in ("load", "denoise", "decode", "flex", "tile_fraction"):
        assert name in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert rows["step"][1] == "3"  # one aggregated row with the count
    assert rows["load"][1] == "1" and rows["total"][1] == "3"  # three top-level stages
    assert "step 1" not in text
    total_s = sum(s.wall_s for s in report.stages if s.parent is None)
    assert float(rows["total"][2]) == pytest.approx(total_s, abs=1e-3)
    detail = report.table(detail=True)
    for i in range(3):
        assert f"  step {i}" in detail


def test_table_families_need_a_separator() -> None:
    prof = Profiler("cpu")
    for name in ("block_1", "block_2", "t5", "clip#1"):
        with prof.stage(name):
            pass
    rows = [line.split() for line in prof.report().table().splitlines()]
    firsts = {r[0]: r[1] for r in rows if len(r) > 1}
    assert firsts["block"] == "2" and firsts["t5"] == "1" and firsts["clip"] == "1"


def test_chrome_trace_is_valid_json_with_matching_durations(report: Report) -> None:
    trace = json.loads(json.dumps(report.chrome_trace()))
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    counters = [e for e in events if e["ph"] == "C"]
    assert [e["name"] for e in complete] == [s.name for s in report.stages]
    for e, s in zip(complete, report.stages):
        assert e["dur"] == pytest.approx(s.wall_s * 1e6)
        assert e["ts"] == pytest.approx(s.start_s * 1e6)
        assert {"pid", "tid", "args"} <= e.keys()
        assert e["args"]["rss_peak_GB"] == pytest.approx(s.rss_peak / 1e9, abs=1e-6)
    assert complete[2]["args"]["step"] == 0
    assert len(counters) == len(report.samples)
    assert all("rss_GB" in e["args"] and "allocated_GB" not in e["args"] for e in counters)
    assert trace["otherData"]["attention_backend"] == "flex"


def test_save_writes_four_files_and_refuses_to_overwrite(report: Report, tmp_path) -> None:
    from PIL import Image

    out = tmp_path / "run"
    paths = report.save(out)
    assert {p.name for p in paths.values()} == {"report.json", "report.txt", "trace.json", "memory.png"}
    assert all(p.is_file() and p.parent == out for p in paths.values())
    with Image.open(paths["memory"]) as img:
        assert img.size == (900, 450) and img.format == "PNG"
        pixels = img.convert("RGB")
        colours = {pixels.getpixel((x, y)) for x in range(0, 900, 1) for y in range(40, 360, 2)}
    assert (44, 160, 44) in colours  # the host RSS line was drawn
    assert Report.load(paths["json"]) == report
    assert "step 2" in paths["text"].read_text()
    json.loads(paths["trace"].read_text())

    before = {k: p.read_bytes() for k, p in paths.items()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        report.save(out)
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    paths["memory"].unlink()  # one existing file is enough to refuse, and nothing is written
    with pytest.raises(FileExistsError):
        report.save(out)
    assert not paths["memory"].exists()
    assert report.save(out, overwrite=True) == paths

    other = report.save(out, prefix="stage1")
    assert {p.name for p in other.values()} == {"stage1.json", "stage1.txt", "stage1_trace.json", "stage1_memory.png"}


def test_disabled_profiler_records_nothing() -> None:
    prof = Profiler(enabled=False)
    _render_like(prof)
    assert prof.sample_memory() is None
    with pytest.raises(KeyError):  # the body still runs and errors still propagate
        with prof.stage("x"):
            raise KeyError("boom")
    empty = prof.report()
    assert empty.stages == () and empty.samples == () and empty.info == {}
    assert "no stages recorded" in empty.table()


def test_report_round_trip_through_json(report: Report) -> None:
    back = Report.from_json(report.to_json())
    assert back == report
    assert isinstance(back.stages[0], StageRecord) and isinstance(back.samples[0], MemorySample)
    with pytest.raises(UserError, match="format"):
        Report.from_dict({"stages": []})
    bad = report.to_dict() | {"version": 99}
    with pytest.raises(UserError, match="version"):
        Report.from_dict(bad)


def test_report_is_a_snapshot_and_json_native() -> None:
    prof = Profiler("cpu")
    prof.note("path", tmp := os.path.join("a", "b"))
    prof.note("dtype", torch.bfloat16)
    with prof.stage("s", shape=(2, 3)):
        pass
    first = prof.report()
    prof.note("later", 1)
    with prof.stage("t"):
        pass
    assert [s.name for s in first.stages] == ["s"] and "later" not in first.info
    assert first.info["dtype"] == "torch.bfloat16" and first.info["path"] == tmp
    assert first.stages[0].info == {"shape": [2, 3]}
    assert Report.from_json(first.to_json()) == first


def test_exception_in_stage_is_recorded_and_propagates() -> None:
    prof = Profiler("cpu")
    with pytest.raises(RuntimeError):
        with prof.stage("outer"):
            with prof.stage("inner"):
                raise RuntimeError("out of memory")
    stages = prof.report().stages
    assert [s.name for s in stages] == ["outer", "inner"]
    assert all(s.info["error"] == "RuntimeError" for s in stages)
    with prof.stage("after"):  # the stack was unwound: a new stage is top level again
        pass
    assert prof.report().stages[-1].depth == 0


def test_open_stages_are_left_out_of_a_report() -> None:
    prof = Profiler("cpu")
    with prof.stage("outer"):
        with prof.stage("inner"):
            pass
        mid = prof.report()
    assert [(s.name, s.parent) for s in mid.stages] == [("inner", None)]
    assert mid.stages[0].depth == 1


def test_two_profilers_are_independent() -> None:
    a, b = Profiler("cpu"), Profiler("cpu")
    a.note("who", "a")
    b.note("who", "b")
    with a.stage("a1"):
        with b.stage("b1"):  # interleaved: b's stage is not nested in a's
            pass
        with a.stage("a2"):
            pass
    ra, rb = a.report(), b.report()
    assert [(s.name, s.depth) for s in ra.stages] == [("a1", 0), ("a2", 1)]
    assert [(s.name, s.depth, s.parent) for s in rb.stages] == [("b1", 0, None)]
    assert ra.info["who"] == "a" and rb.info["who"] == "b"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_rss_follows_an_allocation() -> None:
    page = os.sysconf("SC_PAGE_SIZE")

    def statm_rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    prof = Profiler("cpu")
    before = statm_rss()
    with prof.stage("allocate"):
        block = torch.ones(64 * MB // 4)  # 64 MB, written so the pages are resident
    after = statm_rss()
    record = prof.report().stages[0]
    assert abs(record.rss_end - after) < 16 * MB
    assert record.rss_peak - before > 48 * MB
    with prof.stage("free"):  # the peak includes the stage's start, before the memory went back
        del block
    freed = prof.report().stages[1]
    assert freed.rss_peak - freed.rss_end > 48 * MB


def test_cuda_device_without_cuda_is_a_user_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError, match="device='cpu'"):
        Profiler("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peaks_fold_into_parents() -> None:
    prof = Profiler("cuda")
    base = torch.cuda.memory_allocated()
    with prof.stage("outer"):
        with prof.stage("big"):
            x = torch.empty(256 * MB, dtype=torch.uint8, device="cuda")
            del x
        with prof.stage("small"):
            y = torch.empty(16 * MB, dtype=torch.uint8, device="cuda")
            del y
    torch.cuda.synchronize()
    by_name = {s.name: s for s in prof.report().stages}
    assert by_name["big"].peak_allocated >= base + 256 * MB
    assert by_name["small"].peak_allocated < base + 256 * MB  # counters were reset for it
    assert by_name["outer"].peak_allocated >= by_name["big"].peak_allocated  # folded up
    assert by_name["outer"].peak_reserved >= by_name["outer"].peak_allocated
    assert all(s.wall_s > 0 and s.allocated_end is not None for s in by_name.values())
    assert prof.report().info["device_name"] == torch.cuda.get_device_name()


def test_with_stage_appends_a_top_level_stage(report: Report) -> None:
    """Work after the render (saving its files) joins the report as a last stage; the original is unchanged."""
    saved = report.with_stage("save", 0.25, rss=123, files=4)
    assert len(report.stages) == 6 and len(saved.stages) == 7
    last, end = saved.stages[-1], max(s.end_s for s in report.stages)
    assert (last.name, last.parent, last.depth, last.info) == ("save", None, 0, {"files": 4})
    assert last.start_s == end and last.end_s == pytest.approx(end + 0.25) and last.rss_peak == 123
    assert Report.from_json(saved.to_json()) == saved
    assert "save" in saved.table()
    with pytest.raises(ValueError):
        report.with_stage("save", -1.0)
