"""Block tables are exact: a tile is skipped iff it holds no allowed pair, marked full iff all are allowed.

Checked against `rule.dense_allowed` (the L x L reference) tile by tile, on many
random layouts, orders, phase sets and block shapes (odd ones included).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from threedis.kernels.block_table import (
    BlockTable,
    block_table,
    build_block_table,
    dense_table,
    density,
    tile_report,
)
from threedis.kernels.rule import Phases, RuleError, TokenLayout, box_regions, dense_allowed, membership_order

ALL_PHASES = [Phases(*bits) for bits in itertools.product([False, True], repeat=4)]


def random_regions(gen: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """Random overlapping regions, plus the corner cases: an empty region and one covering everything."""
    regions = torch.rand(n, h, w, generator=gen) > float(torch.rand(1, generator=gen)) * 0.8 + 0.1
    special = int(torch.randint(0, 4, (1,), generator=gen)) if n else 0
    if special == 1:
        regions[0] = False
    elif special == 2:
        regions[-1] = True
    return regions


def brute_force_tiles(tokens: TokenLayout, phases: Phases | None, bm: int, bn: int) -> tuple[list[set], list[set]]:
    """Per query block: key blocks with any allowed pair, and those fully allowed with no ragged tail."""
    allowed = dense_allowed(tokens, phases)
    length = tokens.length
    nq, nk = -(-length // bm), -(-length // bn)
    visit, full = [], []
    for i in range(nq):
        tiles = [allowed[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] for j in range(nk)]
        visit.append({j for j, t in enumerate(tiles) if t.any()})
        full.append({j for j, t in enumerate(tiles) if t.all() and (j + 1) * bn <= length})
    return visit, full


def table_sets(table: BlockTable) -> tuple[list[set], list[set]]:
    visit, full = [], []
    for i in range(table.num_q_blocks):
        n = int(table.kv_count[i])
        row = table.kv_index[i, :n].tolist()
        assert row == sorted(row) and len(set(row)) == n, "key blocks must be distinct and ascending"
        assert (table.kv_index[i, n:] == -1).all() and (table.kv_full[i, n:] == 0).all(), "padding must be inert"
        visit.append(set(row))
        full.append({b for b, f in zip(row, table.kv_full[i, :n].tolist()) if f})
    return visit, full


def test_tables_match_dense_rule_on_random_layouts():
    gen = torch.Generator().manual_seed(1234)
    for case in range(120):
        n = int(torch.randint(0, 6, (1,), generator=gen))
        h, w = (int(x) for x in torch.randint(1, 11, (2,), generator=gen))
        regions = random_regions(gen, n, h, w)
        order = membership_order(regions) if case % 2 else None
        tokens = TokenLayout.build(regions, chunk=int(torch.randint(1, 9, (1,), generator=gen)), order=order)
        phases = ALL_PHASES[case % len(ALL_PHASES)] if case % 7 else None
        bm, bn = (int(x) for x in torch.randint(1, 24, (2,), generator=gen))
        table = build_block_table(tokens, phases, bm, bn)
        assert table.kv_index.dtype == torch.int32 and table.kv_count.dtype == torch.int32
        assert table.kv_full.dtype == torch.int8 and table.kv_index.shape[0] == table.num_q_blocks
        visit, full = table_sets(table)
        expected_visit, expected_full = brute_force_tiles(tokens, phases, bm, bn)
        assert visit == expected_visit, f"case {case}: visited tiles differ from the dense rule"
        assert full == expected_full, f"case {case}: full tiles differ from the dense rule"
        assert table.visited == sum(len(s) for s in expected_visit)
        assert table.tile_fraction == pytest.approx(table.visited / (table.num_q_blocks * table.num_kv_blocks))


def test_density_matches_dense_mean():
    gen = torch.Generator().manual_seed(7)
    for case in range(40):
        n = int(torch.randint(1, 5, (1,), generator=gen))
        regions = random_regions(gen, n, 6, 9)
        tokens = TokenLayout.build(regions, chunk=5)
        phases = ALL_PHASES[case % len(ALL_PHASES)]
        assert density(tokens, phases) == pytest.approx(dense_allowed(tokens, phases).double().mean().item(), abs=1e-12)
    assert density(tokens, None) == 1.0


def test_sparse_layout_skips_tiles_and_dense_table_visits_all():
    regions = box_regions([(0.0, 0.0, 0.4, 0.4), (0.6, 0.6, 1.0, 1.0)], 16, 16)
    tokens = TokenLayout.build(regions, chunk=16)
    table = build_block_table(tokens, Phases(True, True, True, True), 16, 16)
    assert 0 < table.tile_fraction < 1 and 0 < table.full_fraction < table.tile_fraction
    plain = dense_table(tokens.length, 16, 32)
    assert plain.tile_fraction == 1.0
    assert build_block_table(tokens, Phases(False, False, False, False), 16, 32).tile_fraction == 1.0
    assert plain.nbytes == sum(t.numel() * t.element_size() for t in (plain.kv_index, plain.kv_count, plain.kv_full))


def test_block_table_is_cached_per_phases_blocks_and_device():
    regions = box_regions([(0.1, 0.1, 0.5, 0.7)], 8, 8)
    tokens = TokenLayout.build(regions, chunk=8)
    on, off = Phases(True, True, True, True), Phases(False, True, True, True)
    first = block_table(tokens, on, 16, 16)
    assert block_table(tokens, on, 16, 16) is first
    assert block_table(tokens, on, 16, 16, device="cpu") is first
    assert block_table(tokens, off, 16, 16) is not first
    assert block_table(tokens, on, 16, 32) is not first
    other = TokenLayout.build(regions, chunk=8)
    assert block_table(other, on, 16, 16) is not first, "caches live on each layout, not the process"
    fresh = build_block_table(tokens, on, 16, 16)
    assert torch.equal(fresh.kv_index, first.kv_index) and torch.equal(fresh.kv_full, first.kv_full)


def test_tile_report_shows_what_the_permutation_buys():
    boxes = [(0.0, 0.0, 0.45, 0.5), (0.5, 0.3, 1.0, 0.9), (0.2, 0.6, 0.7, 1.0)]
    regions = box_regions(boxes, 24, 24)
    raster = TokenLayout.build(regions, chunk=32)
    permuted = TokenLayout.build(regions, chunk=32, order=membership_order(regions))
    phases = Phases(True, True, True, True)
    report = tile_report(raster, permuted, phases, 32, 32)
    assert report.density == pytest.approx(density(permuted, phases))
    assert report.raster_tile_fraction == build_block_table(raster, phases, 32, 32).tile_fraction
    assert report.permuted_tile_fraction < report.raster_tile_fraction
    assert report.permuted_full_fraction > report.raster_full_fraction
    assert report.density <= report.permuted_tile_fraction
    assert "permuted" in str(report) and report.as_dict()["block_m"] == 32
    with pytest.raises(RuleError):
        tile_report(raster, TokenLayout.build(regions, chunk=16), phases, 32, 32)


def test_bad_block_sizes_raise_rule_error():
    tokens = TokenLayout.build(box_regions([(0, 0, 1, 1)], 2, 2), chunk=2)
    with pytest.raises(RuleError, match="block sizes"):
        build_block_table(tokens, Phases(True, True, True, True), 0, 16)


@pytest.mark.parametrize("backend, tile", [("triton", 32), ("flex", 128), ("sdpa", None)])
def test_attention_sparsity_reports_each_backends_tiles(backend, tile):
    """Density from the dense reference; tile fraction from a table built here at the backend's tile size."""
    from threedis.kernels.attention import attention_sparsity, select_backend

    try:
        select_backend("cpu", torch.float32, backend)
    except RuleError as err:
        pytest.skip(str(err))
    tokens = TokenLayout.build(box_regions([(0.0, 0.1, 0.6, 0.7), (0.3, 0.4, 1.0, 1.0)], 12, 14), chunk=9)
    phases = Phases(True, True, True, True)
    got = attention_sparsity(tokens, phases, "cpu", torch.float32, backend)
    assert got["density"] == pytest.approx(dense_allowed(tokens, phases).double().mean().item(), abs=1e-6)
    if tile is None:
        assert got["tile_fraction"] == 1.0 and "tile" not in got
    else:
        assert got["tile"] == f"{tile}x{tile}"
        assert got["tile_fraction"] == pytest.approx(build_block_table(tokens, phases, tile, tile).tile_fraction)
