"""The attention rule (SPEC section 3) against hand computations and a brute-force evaluation of its table."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from threedis.kernels import rule
from threedis.kernels.rule import Phases, RuleError, Schedule, TokenLayout

ALL_PHASES = [Phases(*bits) for bits in itertools.product([False, True], repeat=4)]
ON = Phases(i2i=True, i2t=True, t2i=True, t2t=True)


# -- brute force, written from SPEC's table, independent of rule.py's bit tricks --


def spec_tokens(regions: torch.Tensor, chunk: int, order: list[int] | None = None) -> list[tuple[str, frozenset]]:
    """[(kind, membership set)] per sequence position: global chunk, instance chunks, image cells."""
    n, h, w = regions.shape
    tokens = [("global", frozenset())] * chunk
    for i in range(n):
        tokens += [("instance", frozenset({i}))] * chunk
    cells = order if order is not None else list(range(h * w))
    for cell in cells:
        r, c = divmod(cell, w)
        tokens.append(("image", frozenset(i for i in range(n) if bool(regions[i, r, c]))))
    return tokens


def spec_restricted(q: tuple[str, frozenset], key_kind: str, p: Phases) -> bool:
    kind, members = q
    if kind == "image" and members:
        return {"global": p.i2t and p.i2i, "instance": p.i2t, "image": p.i2i}[key_kind]
    if kind == "instance":
        return {"global": p.t2t, "instance": p.t2t, "image": p.t2i}[key_kind]
    return False


def spec_allowed(tokens: list[tuple[str, frozenset]], p: Phases) -> torch.Tensor:
    n = len(tokens)
    out = torch.zeros(n, n, dtype=torch.bool)
    for a, q in enumerate(tokens):
        for b, k in enumerate(tokens):
            out[a, b] = not spec_restricted(q, k[0], p) or bool(q[1] & k[1])
    return out


def random_regions(rng: random.Random, n: int, h: int, w: int) -> torch.Tensor:
    if rng.random() < 0.3:  # masks of assorted sizes and dtypes
        g = torch.Generator().manual_seed(rng.randrange(2**31))  # reproducible from rng alone
        masks = [(torch.rand(rng.randint(1, 9), rng.randint(1, 9), generator=g) > 0.6).float() for _ in range(n)]
        return rule.mask_regions(masks, h, w) if n else torch.zeros(0, h, w, dtype=torch.bool)
    boxes = []
    for _ in range(n):
        x0, x1 = sorted(rng.random() for _ in range(2))
        y0, y1 = sorted(rng.random() for _ in range(2))
        boxes.append((x0, y0, x1, y1))
    return rule.box_regions(boxes, h, w)


def random_case(rng: random.Random):
    n, h, w, chunk = rng.randint(0, 6), rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 4)
    regions = random_regions(rng, n, h, w)
    order = None
    if rng.random() < 0.5:
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        order = rule.membership_order(regions) if rng.random() < 0.5 else torch.randperm(h * w, generator=g)
    return regions, chunk, order


# -- SPEC consequences, on a hand-made layout --
# 4x4 grid, chunk 2. Instance 0: rows 0-1, cols 0-2. Instance 1: rows 1-2, cols 2-3.
# Cell (1, 2) is in both; cell (3, 0) is in neither.


@pytest.fixture
def scene():
    regions = rule.box_regions([(0.0, 0.0, 0.75, 0.5), (0.5, 0.25, 1.0, 0.75)], 4, 4)
    tokens = TokenLayout.build(regions, chunk=2)
    t = tokens.text_len  # 6
    pos = {
        "global": list(range(0, 2)),
        "text0": list(range(2, 4)),
        "text1": list(range(4, 6)),
        "region0": [t + r * 4 + c for r in range(0, 2) for c in range(0, 3)],
        "region1": [t + r * 4 + c for r in range(1, 3) for c in range(2, 4)],
        "both": t + 1 * 4 + 2,
        "only0": t + 0 * 4 + 0,
        "outside": t + 3 * 4 + 0,
    }
    return tokens, pos


def test_scene_regions_are_what_the_comment_says(scene):
    tokens, pos = scene
    assert tokens.member[pos["both"]] == 0b11
    assert tokens.member[pos["only0"]] == 0b01
    assert tokens.member[pos["outside"]] == 0


def test_instance_text_never_sees_global_text_while_t2t_on(scene):
    tokens, pos = scene
    for p in ALL_PHASES:
        allowed = rule.dense_allowed(tokens, p)
        block = allowed[pos["text0"] + pos["text1"]][:, pos["global"]]
        assert (not block.any()) if p.t2t else block.all(), p


def test_region_image_sees_global_text_only_after_i2i_ends_while_i2t_on(scene):
    tokens, pos = scene
    during = rule.dense_allowed(tokens, Phases(i2i=True, i2t=True, t2i=True, t2t=True))
    after = rule.dense_allowed(tokens, Phases(i2i=False, i2t=True, t2i=True, t2t=True))
    q = pos["only0"]
    assert not during[q, pos["global"]].any()
    assert after[q, pos["global"]].all()
    # I2T still on: own instance text yes, the other instance's text no
    assert after[q, pos["text0"]].all() and not after[q, pos["text1"]].any()
    # I2I off: all image tokens visible
    assert after[q, tokens.text_len :].all()


def test_overlapping_token_sees_both_texts_and_both_regions(scene):
    tokens, pos = scene
    allowed = rule.dense_allowed(tokens, ON)[pos["both"]]
    assert allowed[pos["text0"]].all() and allowed[pos["text1"]].all()
    assert allowed[pos["region0"]].all() and allowed[pos["region1"]].all()
    assert not allowed[pos["global"]].any()
    assert not allowed[pos["outside"]]
    # exactly the union of both regions among image tokens
    image_allowed = {i for i in range(tokens.text_len, tokens.length) if allowed[i]}
    assert image_allowed == set(pos["region0"]) | set(pos["region1"])


def test_outside_and_global_tokens_are_unrestricted(scene):
    tokens, pos = scene
    for p in ALL_PHASES:
        allowed = rule.dense_allowed(tokens, p)
        assert allowed[pos["outside"]].all(), p
        assert allowed[pos["global"]].all(), p


def test_instance_text_sees_own_region_only_while_t2i_on(scene):
    tokens, pos = scene
    allowed = rule.dense_allowed(tokens, Phases(i2i=False, i2t=False, t2i=True, t2t=False))
    image_allowed = {i for i in range(tokens.text_len, tokens.length) if allowed[pos["text1"][0], i]}
    assert image_allowed == set(pos["region1"])


def test_no_row_is_ever_empty_across_random_layouts():
    rng = random.Random(1)
    for _ in range(60):
        regions, chunk, order = random_case(rng)
        tokens = TokenLayout.build(regions, chunk=chunk, order=order)
        for p in ALL_PHASES:
            assert rule.dense_allowed(tokens, p).any(dim=1).all()


def test_dense_allowed_matches_brute_force_on_random_layouts():
    rng = random.Random(0)
    for case in range(80):
        regions, chunk, order = random_case(rng)
        tokens = TokenLayout.build(regions, chunk=chunk, order=order)
        expected_tokens = spec_tokens(regions, chunk, None if order is None else order.tolist())
        assert tokens.length == len(expected_tokens)
        steps = rng.randint(1, 25)
        schedule = Schedule(
            steps=steps,
            hard=rng.randint(0, steps),
            i2i=rng.randint(0, steps),
            i2t=rng.randint(0, steps),
            t2i=rng.randint(0, steps),
            t2t=rng.randint(0, steps),
        )
        phases = schedule.at(rng.randrange(steps))
        if phases is None:
            assert rule.dense_allowed(tokens, None).all()
            phases = rng.choice(ALL_PHASES)
        got = rule.dense_allowed(tokens, phases)
        want = spec_allowed(expected_tokens, phases)
        assert torch.equal(got, want), (case, phases, (got != want).nonzero()[:5].tolist())


def test_dense_allowed_all_phases_on_one_overlapping_layout():
    regions = rule.box_regions([(0, 0, 0.6, 0.6), (0.4, 0.4, 1, 1), (0.2, 0.5, 0.3, 0.9)], 5, 3)
    expected_tokens = spec_tokens(regions, 3)
    tokens = TokenLayout.build(regions, chunk=3)
    for p in ALL_PHASES:
        assert torch.equal(rule.dense_allowed(tokens, p), spec_allowed(expected_tokens, p)), p


# -- phases over time --


def test_phase_switch_is_on_strictly_before_its_step_count():
    schedule = Schedule(steps=20, hard=20, i2i=4, i2t=20, t2i=7, t2t=0)
    for s in range(20):
        p = schedule.at(s)
        assert (p.i2i, p.i2t, p.t2i, p.t2t) == (s < 4, s < 20, s < 7, False), s
    assert schedule.at(3).i2i and not schedule.at(4).i2i


def test_random_schedules_follow_s_less_than_steps_p():
    rng = random.Random(3)
    for _ in range(200):
        steps = rng.randint(1, 30)
        counts = {name: rng.randint(0, steps + 2) for name in ("i2i", "i2t", "t2i", "t2t")}
        hard = rng.randint(0, steps)
        schedule = Schedule(steps=steps, hard=hard, **counts)
        for s in range(steps):
            p = schedule.at(s)
            if s >= hard:
                assert p is None
            else:
                assert p == Phases(**{name: s < n for name, n in counts.items()})


def test_at_is_none_from_hard_on():
    schedule = Schedule(steps=20, hard=2)
    assert schedule.at(1) is not None
    assert schedule.at(2) is None and schedule.at(19) is None and schedule.at(25) is None
    assert Schedule(steps=5, hard=0).at(0) is None


@pytest.mark.parametrize("field", ["steps", "hard", "i2i", "i2t", "t2i", "t2t"])
def test_schedule_rejects_negative_and_non_integers(field):
    with pytest.raises(RuleError, match=field):
        Schedule(**{field: -1})
    with pytest.raises(RuleError, match=field):
        Schedule(**{field: 2.5})


# -- regions --


def cells(region: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(rc) for rc in region.nonzero().tolist()}


def test_box_regions_hand_cases():
    h, w = 4, 8
    boxes = [
        (0.0, 0.0, 1.0, 1.0),  # whole grid
        (0.25, 0.25, 0.5, 0.75),  # exact cell boundaries: cols 2..3, rows 1..2
        (0.26, 0.24, 0.49, 0.76),  # just inside/outside boundaries: floor/ceil widen to cols 2..3, rows 0..3
        (0.5, 0.5, 0.5, 0.5),  # zero area on a boundary: nothing
        (0.1, 0.1, 0.1, 0.1),  # zero area inside a cell
        (0.9, 0.0, 1.0, 0.01),  # last column, thin top row
    ]
    regions = rule.box_regions(boxes, h, w)
    assert regions.shape == (6, h, w) and regions.dtype == torch.bool
    assert regions[0].all()
    assert cells(regions[1]) == {(r, c) for r in (1, 2) for c in (2, 3)}
    assert cells(regions[2]) == {(r, c) for r in (0, 1, 2, 3) for c in (2, 3)}
    assert cells(regions[3]) == set()
    # zero area inside a cell: h*y = 0.4 -> floor 0, ceil 1, so the cell holding the point is covered
    assert cells(regions[4]) == {(0, 0)}
    assert cells(regions[5]) == {(0, 7)}


def test_box_regions_brute_force_against_spec_formula():
    rng = random.Random(5)
    for _ in range(100):
        h, w = rng.randint(1, 12), rng.randint(1, 12)
        # multiples of 1/(2h), 1/(2w) hit cell boundaries and cell centres exactly
        y0, y1 = sorted(rng.randint(0, 2 * h) / (2 * h) for _ in range(2))
        x0, x1 = sorted(rng.randint(0, 2 * w) / (2 * w) for _ in range(2))
        got = cells(rule.box_regions([(x0, y0, x1, y1)], h, w)[0])
        want = {
            (r, c)
            for r in range(h)
            for c in range(w)
            if math.floor(h * y0) <= r < math.ceil(h * y1) and math.floor(w * x0) <= c < math.ceil(w * x1)
        }
        assert got == want, (h, w, (x0, y0, x1, y1))


def test_box_regions_decimal_boundaries_are_exact():
    # 0.28 of a 25-row grid ends exactly at row 7 (a 400-px image, 25 latent tokens)
    region = rule.box_regions([(0.0, 0.0, 0.28, 0.28)], 25, 25)[0]
    assert cells(region) == {(r, c) for r in range(7) for c in range(7)}


def test_box_regions_accepts_tensors_and_rejects_bad_boxes():
    as_tensor = rule.box_regions(torch.tensor([[0.0, 0.0, 0.5, 0.5]]), 2, 2)
    assert cells(as_tensor[0]) == {(0, 0)}
    with pytest.raises(RuleError, match="box 0"):
        rule.box_regions([(0.0, 0.0, 0.5)], 2, 2)


def test_mask_regions_hand_cases():
    # 4x4 mask, top-left 2x2 on, down to 2x2: each output samples the centre of a 2x2 block
    mask = torch.zeros(4, 4)
    mask[:2, :2] = 1
    assert cells(rule.mask_regions([mask], 2, 2)[0]) == {(0, 0)}
    # 2x2 mask with only (0,0) on, up to 4x4: source coordinates (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25
    # (clamped at 0 and 1); weight on source row 0 is 1, 0.75, 0.25, 0 -> rows 0..2 and cols 0..2 positive
    small = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert cells(rule.mask_regions([small], 4, 4)[0]) == {(r, c) for r in range(3) for c in range(3)}


def test_mask_regions_other_sizes_match_bilinear_interpolation():
    torch.manual_seed(0)
    shapes = [(7, 5), (16, 16), (3, 11), (1, 1), (40, 9)]
    masks = [(torch.rand(s) > 0.7) for s in shapes]  # bool
    masks.append((torch.rand(9, 9) * 255).to(torch.uint8) * (torch.rand(9, 9) > 0.8))  # uint8
    masks.append(torch.randn(6, 13).clamp(max=0.3) - 0.1)  # float with negative values
    h, w = 5, 6
    regions = rule.mask_regions(masks, h, w)
    assert regions.shape == (len(masks), h, w)
    for i, m in enumerate(masks):
        expected = F.interpolate(m.double()[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0
        assert torch.equal(regions[i], expected), i
    # a stack of equal-size masks works like a list
    stack = torch.stack([masks[1].float(), masks[1].float()])
    assert torch.equal(rule.mask_regions(stack, h, w), regions[[1, 1]])


def test_mask_regions_rejects_non_2d():
    with pytest.raises(RuleError, match="mask 0"):
        rule.mask_regions([torch.ones(1, 3, 3)], 2, 2)


# -- membership --


def test_membership_bits_by_hand():
    regions = torch.zeros(3, 2, 2, dtype=torch.bool)
    regions[0, 0, 0] = regions[1, 0, 0] = True
    regions[2, 1, 1] = True
    assert rule.membership_bits(regions).tolist() == [0b011, 0, 0, 0b100]
    assert rule.membership_bits(torch.zeros(0, 2, 3, dtype=torch.bool)).tolist() == [0] * 6


def test_membership_order_is_stable_and_groups():
    rng = random.Random(7)
    for _ in range(30):
        n, h, w = rng.randint(0, 6), rng.randint(1, 8), rng.randint(1, 8)
        regions = random_regions(rng, n, h, w)
        order = rule.membership_order(regions).tolist()
        assert sorted(order) == list(range(h * w))
        sets = [tuple(i for i in range(n) if bool(regions[i, c // w, c % w])) for c in range(h * w)]
        seq = [sets[c] for c in order]
        # grouping: each membership set forms one contiguous run
        runs = [key for key, _ in itertools.groupby(seq)]
        assert len(runs) == len(set(runs))
        # stability: inside a run, raster order is kept
        for key in set(seq):
            positions = [c for c in order if sets[c] == key]
            assert positions == sorted(positions)


def test_instance_count_limit():
    assert rule.MAX_INSTANCES == 63
    ok = [(0.0, 0.0, 1.0, 1.0)] * 63
    assert rule.box_regions(ok, 2, 2).shape[0] == 63
    with pytest.raises(RuleError, match="at most 63"):
        rule.box_regions(ok + ok[:1], 2, 2)
    with pytest.raises(RuleError, match="at most 63"):
        rule.mask_regions([torch.ones(2, 2)] * 64, 2, 2)
    with pytest.raises(RuleError, match="at most 63"):
        TokenLayout.build(torch.ones(64, 2, 2, dtype=torch.bool), chunk=1)
    # 63 instances: bit 62 is the highest used and every membership stays non-negative
    tokens = TokenLayout.build(torch.ones(63, 2, 2, dtype=torch.bool), chunk=1)
    assert (tokens.member >= 0).all()
    assert int(tokens.member[-1]) == (1 << 63) - 1


# -- TokenLayout --


def test_build_layout_by_hand():
    regions = rule.box_regions([(0, 0, 0.5, 1), (0.5, 0, 1, 0.5)], 2, 2)
    tokens = TokenLayout.build(regions, chunk=3)
    assert tokens.text_len == 9 and tokens.length == 13 and tokens.grid == (2, 2) and tokens.num_instances == 2
    assert tokens.kind.tolist() == [0] * 3 + [1] * 6 + [2] * 4
    assert tokens.member.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [1, 2, 1, 0]
    assert tokens.member.dtype == torch.int64 and tokens.kind.dtype == torch.int8


def test_build_with_order_permutes_image_members():
    rng = random.Random(11)
    for _ in range(20):
        n, h, w = rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 6)
        regions = random_regions(rng, n, h, w)
        order = torch.randperm(h * w, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        tokens = TokenLayout.build(regions, chunk=2, order=order)
        image = tokens.member[tokens.text_len :].tolist()
        for j, cell in enumerate(order.tolist()):
            r, c = divmod(cell, w)
            assert image[j] == sum(1 << i for i in range(n) if bool(regions[i, r, c]))
        assert torch.equal(tokens.order, order)
    two_by_two = torch.ones(1, 2, 2, dtype=torch.bool)
    for bad in (torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 4])):
        with pytest.raises(RuleError, match="permutation"):
            TokenLayout.build(two_by_two, chunk=2, order=bad)


def test_build_rejects_bad_arguments():
    with pytest.raises(RuleError, match="regions"):
        TokenLayout.build(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(RuleError, match="chunk"):
        TokenLayout.build(torch.ones(1, 2, 2, dtype=torch.bool), chunk=0)


def test_to_keeps_data_and_starts_a_fresh_cache():
    regions = rule.box_regions([(0, 0, 0.5, 0.5)], 3, 3)
    tokens = TokenLayout.build(regions, chunk=2, order=rule.membership_order(regions))
    tokens.cache["x"] = 1
    moved = tokens.to("cpu")
    assert moved is not tokens
    assert torch.equal(moved.member, tokens.member) and torch.equal(moved.kind, tokens.kind)
    assert (moved.text_len, moved.grid, moved.chunk, moved.num_instances) == (
        tokens.text_len,
        tokens.grid,
        tokens.chunk,
        tokens.num_instances,
    )
    assert torch.equal(moved.order, tokens.order)
    assert moved.cache == {}
    assert moved.device == torch.device("cpu")
    meta = tokens.to("meta")
    assert meta.member.device.type == "meta" and meta.member.shape == tokens.member.shape


def test_query_restrictions_match_phase_bits():
    regions = rule.box_regions([(0, 0, 0.5, 0.5)], 2, 2)
    tokens = TokenLayout.build(regions, chunk=1)
    # tokens: global, inst0 text, image (0,0) in region, three outside
    image_bits, text_bits = ON.restricted_kinds()
    assert (image_bits, text_bits) == (0b111, 0b111)
    assert rule.query_restrictions(tokens, ON).tolist() == [0, 0b111, 0b111, 0, 0, 0]
    p = Phases(i2i=False, i2t=True, t2i=True, t2t=False)
    assert rule.query_restrictions(tokens, p).tolist() == [0, 0b100, 0b010, 0, 0, 0]


def test_zero_instances_is_all_global_text_and_unrestricted():
    tokens = TokenLayout.build(torch.zeros(0, 3, 5, dtype=torch.bool), chunk=4)
    assert tokens.length == 4 + 15 and tokens.text_len == 4 and tokens.num_instances == 0
    assert (tokens.member == 0).all()
    for p in ALL_PHASES:
        assert rule.dense_allowed(tokens, p).all()
