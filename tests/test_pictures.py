"""Pictures (contract 7): sizes, modes, and pixels checked against the dense rule and the regions."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image

from threedis.engine import pictures
from threedis.engine.layout import Instance, Layout, example_path
from threedis.engine.pictures import draw_allowed, draw_layout, draw_regions, instance_color
from threedis.kernels.rule import Phases, TokenLayout, box_regions, dense_allowed, membership_order

ALL_PHASES = [Phases(*bits) for bits in itertools.product([False, True], repeat=4)]


def small_regions() -> torch.Tensor:
    """3 overlapping instances on an odd 3 x 5 grid, plus cells outside every region."""
    regions = torch.zeros(3, 3, 5, dtype=torch.bool)
    regions[0, 0:2, 0:2] = True
    regions[1, 1:3, 1:4] = True
    regions[2, 0, 3] = True
    return regions


def pixels(image: Image.Image) -> torch.Tensor:
    """uint8[H, W, 3] view of an RGB image, built independently of the module's own helper."""
    width, height = image.size
    return torch.tensor(list(image.convert("RGB").tobytes()), dtype=torch.uint8).reshape(height, width, 3)


# -- draw_layout --------------------------------------------------------------------


def test_draw_layout_grey_canvas():
    layout = Layout("a park", 320, 160, (Instance("a red bird", (0.1, 0.2, 0.5, 0.9)), Instance("a dog", (0.6, 0.1, 0.9, 0.5))))
    image = draw_layout(layout)
    assert image.mode == "RGB" and image.size == (320, 160)
    # Box outlines carry the instance's colour; the inside and the outside stay neutral grey.
    assert image.getpixel((32, 120)) == instance_color(0)  # left edge of box 0, below its label
    assert image.getpixel((int(0.9 * 320) - 1, 40)) == instance_color(1)  # right edge of box 1
    assert image.getpixel((100, 120)) == (128, 128, 128)
    assert image.getpixel((300, 150)) == (128, 128, 128)
    # A label is drawn at the top-left of each box.
    label = pixels(image)[33:45, 33:100].reshape(-1, 3)
    assert (label == torch.tensor(instance_color(0), dtype=torch.uint8)).all(1).any()
    assert (label != torch.tensor(instance_color(0), dtype=torch.uint8)).any(1).any()


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB"])
def test_draw_layout_over_depth_of_other_size(mode):
    layout = Layout.load(example_path("still_life"))
    if mode == "I;16":
        depth = Image.new("I;16", (96, 128), 40000)
    else:
        depth = Image.new(mode, (96, 128), 200 if mode == "L" else (200, 200, 200))
    image = draw_layout(layout, depth)
    assert image.mode == "RGB" and image.size == (768, 1024)
    corner = image.getpixel((760, 20))  # outside every box: the depth shows through
    assert corner[0] == corner[1] == corner[2] and corner != (128, 128, 128)


def test_draw_layout_tints_mask(tmp_path):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # left half
    mask.save(tmp_path / "m.png")
    layout = Layout.from_dict(
        {"prompt": "a park", "width": 256, "height": 256, "instances": [{"prompt": "a bird", "box": [0, 0, 1, 1], "mask": "m.png"}]},
        base_dir=tmp_path,
    )
    image = draw_layout(layout)
    inside, outside = image.getpixel((60, 200)), image.getpixel((200, 200))
    assert outside == (128, 128, 128)
    assert inside != outside and inside[0] > inside[2]  # red-ish tint of instance 0


def test_draw_layout_many_instances_distinct_colours():
    colours = {instance_color(i) for i in range(63)}
    assert len(colours) == 63
    layout = Layout("x", 64, 64, tuple(Instance(f"thing number {i} " * 5, (0, 0, 1, 1)) for i in range(20)))
    assert draw_layout(layout).size == (64, 64)


# -- draw_regions --------------------------------------------------------------------


def test_draw_regions_tints_exactly_the_covered_cells():
    regions = small_regions()
    n, h, w = regions.shape
    scale = 10
    image = draw_regions(regions, labels=[""] * n, scale=scale)
    assert image.mode == "RGB" and image.size == (w * scale, h * scale)
    px = pixels(image)
    centre = {(r, c): tuple(px[r * scale + scale // 2, c * scale + scale // 2].tolist()) for r in range(h) for c in range(w)}
    membership = {(r, c): frozenset(i for i in range(n) if regions[i, r, c]) for r in range(h) for c in range(w)}
    background = centre[(2, 4)]
    assert membership[(2, 4)] == frozenset()
    for cell, members in membership.items():
        assert (centre[cell] == background) == (not members), cell
    # Cells with the same instance set look the same; different sets look different.
    by_set: dict[frozenset, set] = {}
    for cell, members in membership.items():
        by_set.setdefault(members, set()).add(centre[cell])
    assert all(len(colours) == 1 for colours in by_set.values())
    assert len({next(iter(c)) for c in by_set.values()}) == len(by_set)
    # The overlap of instances 0 and 1 (cell (1, 1)) is a blend, not either instance's own tint.
    assert membership[(1, 1)] == {0, 1}
    assert centre[(1, 1)] not in (centre[(0, 0)], centre[(2, 2)])
    # Tints lean towards each instance's own colour (red-ish for 0, blue-ish for 2).
    assert centre[(0, 0)][0] > centre[(0, 0)][2] and centre[(0, 3)][2] > centre[(0, 3)][0]
    # Grid lines separate cells: a cell's first pixel row differs from its inside.
    assert tuple(px[scale, scale // 2].tolist()) != centre[(1, 0)]
    assert tuple(px[scale // 2, 3 * scale].tolist()) != centre[(0, 3)]


def test_draw_regions_labels_and_default_scale():
    regions = small_regions()
    plain = draw_regions(regions, labels=["", "", ""], scale=20)
    labelled = draw_regions(regions, labels=["bird", "dog", "cat"], scale=20)
    assert plain.size == labelled.size == (100, 60)
    assert pixels(plain).ne(pixels(labelled)).any()
    assert draw_regions(regions).size == (5 * 102, 3 * 102)  # about 512 on the long side
    big = box_regions([(0.1, 0.1, 0.6, 0.6)], 64, 64)
    assert draw_regions(big).size == (512, 512)
    with pytest.raises(ValueError):
        draw_regions(regions, labels=["one"])


def test_draw_regions_no_instances():
    image = draw_regions(torch.zeros(0, 4, 6, dtype=torch.bool), scale=2)
    assert image.size == (12, 8) and pixels(image).reshape(-1, 3).unique(dim=0).shape[0] == 1


# -- draw_allowed ------------------------------------------------------------------------


def _tokens(order: bool = False) -> TokenLayout:
    regions = small_regions()
    return TokenLayout.build(regions, chunk=2, order=membership_order(regions) if order else None)


def _random_tokens() -> TokenLayout:
    generator = torch.Generator().manual_seed(0)
    regions = torch.rand(6, 7, 9, generator=generator) > 0.6  # many distinct memberships
    return TokenLayout.build(regions, chunk=3, order=membership_order(regions))  # L = 21 + 63 = 84


def test_draw_allowed_phases_none_is_white():
    tokens = TokenLayout.build(box_regions(Layout.load(example_path("two_birds")).boxes, 32, 32), chunk=200)
    image = draw_allowed(tokens, None, size=256, separators=False)
    assert image.size == (256, 256) and image.mode == "RGB"
    assert (pixels(image) == 255).all()
    lined = pixels(draw_allowed(tokens, None, size=256))
    grey_or_white = (lined == lined[..., :1]).all(-1)
    assert (lined[grey_or_white] == 255).all() and (~grey_or_white).any()


@pytest.mark.parametrize("case", ["raster", "ordered", "random"])
@pytest.mark.parametrize("phases", ALL_PHASES, ids=lambda p: "".join(str(int(b)) for b in (p.i2i, p.i2t, p.t2i, p.t2t)))
def test_draw_allowed_matches_dense_exactly(phases, case):
    tokens = _random_tokens() if case == "random" else _tokens(order=case == "ordered")
    length = tokens.length
    expected = dense_allowed(tokens, phases)  # [L, L]
    image = draw_allowed(tokens, phases, size=length, separators=False)
    assert image.size == (length, length)
    px = pixels(image)
    assert torch.equal(px[..., 0] == 255, expected)
    assert ((px == 0) | (px == 255)).all() and (px == px[..., :1]).all()


def test_draw_allowed_enlarges_small_sequences_and_draws_separators():
    tokens = _tokens()
    phases = Phases(True, True, True, True)
    expected = dense_allowed(tokens, phases)
    length, factor = tokens.length, 4
    image = draw_allowed(tokens, phases, size=length * factor + 3)  # a whole factor of 4
    assert image.size == (length * factor, length * factor)
    px = pixels(image)
    lines = [b * factor for b in (2, 4, 6, 8)]  # chunk boundaries and the text/image boundary
    on_line = torch.zeros(length * factor, dtype=torch.bool)
    on_line[lines] = True
    keep = ~(on_line[:, None] | on_line[None, :])
    enlarged = expected.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    assert torch.equal((px[..., 0] == 255)[keep], enlarged[keep])
    # Separator pixels are coloured (neither grey nor white), so they never read as mask values.
    line_px = px[on_line]
    assert (line_px != line_px[..., :1]).any(-1).all()


@pytest.mark.parametrize("case", ["boxes", "random", "random_tiny_blocks"])
def test_draw_allowed_downsampled_is_mean_pooled(case, monkeypatch):
    if case == "boxes":
        regions = box_regions([(0.0, 0.0, 0.6, 0.5), (0.3, 0.2, 1.0, 1.0)], 7, 9)
        tokens = TokenLayout.build(regions, chunk=5)  # L = 15 + 63 = 78
    else:
        tokens = _random_tokens()
    if case == "random_tiny_blocks":  # force the blocked loop through many small blocks
        monkeypatch.setattr(pictures, "_PAIRS_PER_BLOCK", 50)
    phases = Phases(True, True, False, True)
    size = 20
    dense = dense_allowed(tokens, phases).to(torch.float64)
    length = tokens.length
    px = pixels(draw_allowed(tokens, phases, size=size, separators=False))[..., 0]
    assert px.shape == (size, size)
    # Reference: pixel p shows the tokens t with floor(t * size / L) == p; its value is the mean.
    groups = [[t for t in range(length) if t * size // length == p] for p in range(size)]
    for i, rows in enumerate(groups):
        for j, cols in enumerate(groups):
            mean = dense[rows][:, cols].mean()
            assert int(px[i, j]) == int(torch.round(mean * 255)), (i, j)
    assert len(set(px.flatten().tolist())) > 2  # partly allowed pixels are grey


def test_draw_allowed_large_layout_in_blocks():
    layout = Layout.load(example_path("reading_girl"))
    regions = box_regions(layout.boxes, *layout.grid)
    tokens = TokenLayout.build(regions, chunk=200)
    assert tokens.length == 6096
    image = draw_allowed(tokens, Phases(True, True, True, True), size=512)
    assert image.size == (512, 512)
    px = pixels(image)[..., 0]
    # Global-text queries are never restricted: the first pixel row (tokens 0..11) is all white
    # apart from separator columns.
    grey = (pixels(image)[0] == pixels(image)[0][:, :1]).all(-1)
    assert (px[0][grey] == 255).all()
    # An instance-text query under T2T never sees the global text: dark where both are text.
    assert px[20, 5] == 0


# -- the pictures written beside every render ---------------------------------------------


def test_rule_pictures_one_attention_picture_per_phase_change():
    from threedis.engine.pictures import rule_pictures
    from threedis.kernels.rule import Schedule

    regions = small_regions()
    schedule = Schedule(steps=6, hard=5, i2i=2, i2t=5, t2i=5, t2t=3)  # phases change at steps 2 and 3; plain from 5
    out = rule_pictures(regions, ["bird", "dog", "cat"], chunk=2, schedule=schedule, size=200)
    assert list(out) == ["regions", "attention", "attention-step2", "attention-step3"]
    assert out["regions"].size == draw_regions(regions).size
    for name, step in (("attention", 0), ("attention-step2", 2), ("attention-step3", 3)):
        tokens = _tokens()
        assert out[name].size == (tokens.length * (200 // tokens.length),) * 2
        expected = draw_allowed(tokens, schedule.at(step), size=200)
        assert pixels(out[name]).equal(pixels(expected)), name
    # grouped token order, as the engine uses with permute_tokens
    grouped = rule_pictures(regions, ["bird", "dog", "cat"], 2, Schedule(steps=1, hard=1), permute_tokens=True)
    assert pixels(grouped["attention"]).equal(pixels(draw_allowed(_tokens(order=True), Schedule(1, 1).at(0))))
    assert "attention" not in rule_pictures(regions, ["a", "b", "c"], 2, Schedule(steps=4, hard=0))


def test_save_rule_pictures_uses_the_render_masks_and_never_overwrites(tmp_path):
    from types import SimpleNamespace

    from threedis.engine.pictures import save_rule_pictures

    layout = Layout("a park", 96, 64, (Instance("a bird", (0.0, 0.0, 0.5, 0.5)), Instance("a dog", (0.5, 0.5, 1, 1))))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (80, 0, 96, 16))  # top-right token cell only: not the box
    result = SimpleNamespace(layout=layout, masks=[mask, None], settings={
        "chunk": 3, "schedule": {"steps": 2, "hard": 2, "i2i": 1, "i2t": 2, "t2i": 2, "t2t": 2}})
    (tmp_path / "attention-1.png").write_bytes(b"mine")
    written = save_rule_pictures(result, tmp_path / "image-1.png")
    assert written == {"regions": tmp_path / "regions-1.png", "attention-step1": tmp_path / "attention-step1-1.png"}
    assert (tmp_path / "attention-1.png").read_bytes() == b"mine"
    # the regions picture shows the mask's cell for instance 0, not its box
    grid_regions = torch.zeros(2, 4, 6, dtype=torch.bool)
    grid_regions[0, 0, 5] = True
    grid_regions[1] = box_regions([(0.5, 0.5, 1, 1)], 4, 6)[0]
    with Image.open(written["regions"]) as saved:
        expected = draw_regions(grid_regions, labels=["0: a bird", "1: a dog"])
        assert pixels(saved).equal(pixels(expected))
