"""Layout format (contract 4): every validation rule, round trips, masks, bundled examples."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from PIL import Image

from threedis.engine.errors import UserError
from threedis.engine.layout import (
    MAX_INSTANCES,
    Instance,
    Layout,
    LayoutError,
    LayoutLimits,
    example_path,
    list_examples,
)
from threedis.kernels import rule


def good() -> dict:
    return {
        "prompt": "a park",
        "width": 512,
        "height": 256,
        "instances": [
            {"prompt": "a red bird", "box": [0.1, 0.2, 0.4, 0.6]},
            {"prompt": "a blue bird", "box": [0.5, 0.1, 0.9, 0.9]},
            {"prompt": "a dog", "box": [0, 0, 1, 1]},
        ],
    }


def fails(data: dict, field: str, *words: str, base_dir=None) -> LayoutError:
    """Assert from_dict rejects `data` with one line naming `field` (and the given words)."""
    with pytest.raises(LayoutError) as info:
        Layout.from_dict(data, base_dir=base_dir)
    err = info.value
    message = str(err)
    assert err.field == field, message
    assert message.startswith(f"{field}:"), message
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return err


def with_(path: str, value, data: dict | None = None) -> dict:
    """Copy of good() with one value replaced; path like 'instances.2.box' or 'width'."""
    data = copy.deepcopy(good() if data is None else data)
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    target = data
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return data


def test_error_types():
    assert issubclass(LayoutError, UserError) and issubclass(LayoutError, ValueError)
    assert MAX_INSTANCES == rule.MAX_INSTANCES


def test_good_layout_and_prompts():
    layout = Layout.from_dict(good())
    assert layout.boxes == [(0.1, 0.2, 0.4, 0.6), (0.5, 0.1, 0.9, 0.9), (0.0, 0.0, 1.0, 1.0)]
    assert isinstance(layout.instances, tuple) and layout.grid == (16, 32)
    assert layout.prompts() == ["a park,a red bird,a blue bird,a dog", "a red bird", "a blue bird", "a dog"]
    assert layout.prompts(append_instances=False) == ["a park", "a red bird", "a blue bird", "a dog"]
    empty = Layout.from_dict({"prompt": "a park", "width": 16, "height": 32})
    assert empty.instances == () and empty.prompts() == ["a park"]


# -- boxes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "box, words",
    [
        ([0.1, 0.2, 1.2, 0.6], ["x1", "outside [0, 1]"]),
        ([-0.1, 0.2, 0.4, 0.6], ["x0", "outside [0, 1]"]),
        ([0.1, 0.2, 0.4, 1.0001], ["y1", "outside"]),
        ([0.4, 0.2, 0.4, 0.6], ["x0", "smaller than x1"]),
        ([0.5, 0.2, 0.4, 0.6], ["x0", "smaller than x1"]),
        ([0.1, 0.6, 0.4, 0.6], ["y0", "smaller than y1"]),
        ([0.1, 0.2, 0.4], ["3 values", "4 numbers"]),
        ([0.1, 0.2, 0.4, 0.6, 0.7], ["5 values"]),
        ("0.1 0.2 0.4 0.6", ["a string", "4 numbers"]),
        ({"x0": 0}, ["an object"]),
        (None, ["null"]),
        ([0.1, True, 0.4, 0.6], ["y0", "a boolean", "not a number"]),
        ([0.1, "0.2", 0.4, 0.6], ["y0", "a string", "not a number"]),
        ([0.1, 0.2, float("nan"), 0.6], ["x1", "nan"]),
    ],
)
def test_bad_box(box, words):
    fails(with_("instances.2.box", box), "instances[2].box", *words)


def test_box_as_tuple_and_ints_accepted():
    inst = Instance("a cat", (0, 0, 1, 1))
    assert inst.box == (0.0, 0.0, 1.0, 1.0) and all(type(v) is float for v in inst.box)
    assert Instance("a cat", [0.25, 0.5, 0.75, 1]).box == (0.25, 0.5, 0.75, 1.0)


def test_direct_instance_construction_validates():
    with pytest.raises(LayoutError, match=r"^instance\.box: x1 = 2"):
        Instance("a cat", (0.1, 0.1, 2, 0.5))
    with pytest.raises(LayoutError, match=r"^instance\.prompt: is empty"):
        Instance("  ", (0.1, 0.1, 0.2, 0.5))


# -- prompts ---------------------------------------------------------------------


def test_empty_prompts_are_told_apart_from_other_problems():
    """A caller that reads no prompt (a photo's depth, a plan) lets EmptyPromptError pass and nothing else."""
    from threedis.engine.layout import EmptyPromptError

    data = {"prompt": " ", "width": 64, "height": 64,
            "instances": [{"prompt": "", "box": [0, 0, 1, 1]}, {"prompt": "a cat", "box": [0, 0, 2, 1]}]}
    with pytest.raises(LayoutError) as caught:
        Layout.from_dict(data)
    kinds = {p.field: isinstance(p, EmptyPromptError) for p in caught.value.problems}
    assert kinds == {"prompt": True, "instances[0].prompt": True, "instances[1].box": False}


@pytest.mark.parametrize("value, words", [("", ["empty"]), ("  \n\t", ["empty"]), (7, ["a string", "int"]), (None, ["null"])])
def test_bad_global_prompt(value, words):
    fails(with_("prompt", value), "prompt", *words)


@pytest.mark.parametrize("value, words", [("", ["empty"]), ("   ", ["empty"]), (["a", "b"], ["a list"])])
def test_bad_instance_prompt(value, words):
    fails(with_("instances.1.prompt", value), "instances[1].prompt", *words)


# -- sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("width", 1000, ["multiple of 16", "992 or 1008"]),
        ("height", 520, ["multiple of 16", "512 or 528"]),
        ("width", 8, ["16"]),
        ("width", 0, ["positive", "16"]),
        ("height", -32, ["positive", "16"]),
        ("width", 512.0, ["whole number", "float"]),
        ("height", "512", ["whole number", "a string"]),
        ("width", True, ["whole number", "a boolean"]),
    ],
)
def test_bad_size(field, value, words):
    err = fails(with_(field, value), field, *words)
    if value == 0:
        assert "nearest valid: 16" in str(err)


def test_size_direct_construction():
    with pytest.raises(LayoutError, match=r"^height: .*nearest valid: 1008 or 1024"):
        Layout("a park", 1024, 1010)


# -- counts, keys, types ------------------------------------------------------------


def test_too_many_instances():
    data = good()
    data["instances"] = [{"prompt": f"thing {i}", "box": [0, 0, 1, 1]} for i in range(MAX_INSTANCES + 1)]
    fails(data, "instances", str(MAX_INSTANCES + 1), f"at most {MAX_INSTANCES}", "64-bit", "bitmask")
    data["instances"] = data["instances"][:MAX_INSTANCES]
    assert len(Layout.from_dict(data).instances) == MAX_INSTANCES
    inst = Instance("x", (0, 0, 1, 1))
    with pytest.raises(LayoutError, match="64-bit"):
        Layout("a park", 64, 64, (inst,) * (MAX_INSTANCES + 1))


def test_unknown_keys():
    fails(with_("promt", "x"), "promt", "unknown key", "prompt, width, height, instances")
    fails(with_("instances.0.colour", "red"), "instances[0].colour", "unknown key", "prompt, box, mask")


def test_missing_keys():
    data = good()
    del data["height"]
    fails(data, "height", "missing")
    data = good()
    del data["instances"][1]["box"]
    fails(data, "instances[1].box", "missing")


def test_wrong_container_types():
    fails(with_("instances", {"prompt": "x"}), "instances", "list", "an object")
    fails(with_("instances.0", "a red bird"), "instances[0]", "JSON object", "a string")
    with pytest.raises(LayoutError, match="must be a JSON object"):
        Layout.from_dict(["not", "a", "dict"])
    with pytest.raises(LayoutError, match=r"^instances\[0\]: must be an Instance"):
        Layout("a park", 64, 64, ({"prompt": "x", "box": [0, 0, 1, 1]},))


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    data = {
        "prompt": " ",
        "width": 500,
        "colour": "red",
        "instances": [
            {"prompt": "a red bird", "box": [0.5, 0.2, 0.4, 0.6]},
            {"prompt": "", "box": [0.1, 0.2, 0.4, 1.5], "mask": "gone.png", "size": 3},
            "a dog",
        ],
    }
    with pytest.raises(LayoutError) as info:
        Layout.from_dict(data, base_dir=tmp_path)
    err = info.value
    fields = [problem.field for problem in err.problems]
    assert fields == [
        "colour", "height", "prompt", "width", "instances[0].box",
        "instances[1].size", "instances[1].prompt", "instances[1].box", "instances[1].mask", "instances[2]",
    ]
    for problem in err.problems:
        message = str(problem)
        assert message.startswith(f"{problem.field}:") and "\n" not in message and "more problem" not in message
    # The error itself is one line: the first problem and how many more there are.
    assert err.field == "colour" and "\n" not in str(err)
    assert str(err).startswith("colour: unknown key") and "(and 9 more problems" in str(err)
    # A single problem keeps its plain message.
    one = fails(with_("instances.1.box", [0.5, 0.2, 0.4, 0.6]), "instances[1].box", "smaller than x1")
    assert one.problems == (one,) and "more problem" not in str(one)


# -- masks ---------------------------------------------------------------------


def _mask(path: Path, size=(40, 30)) -> Path:
    image = Image.new("L", size, 0)
    image.paste(255, (10, 5, 30, 25))
    image.save(path)
    return path


def test_mask_relative_to_layout_file(tmp_path, monkeypatch):
    folder = tmp_path / "scene"
    (folder / "masks").mkdir(parents=True)
    _mask(folder / "masks" / "bird.png")
    data = with_("instances.0.mask", "masks/bird.png")
    (folder / "layout.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)  # the cwd must not matter
    layout = Layout.load(folder / "layout.json")
    assert Path(layout.instances[0].mask) == (folder / "masks" / "bird.png").resolve()
    masks = layout.load_masks()
    assert masks[1] is None and masks[2] is None
    assert masks[0].mode == "L" and masks[0].size == (40, 30)
    assert masks[0].getpixel((0, 0)) == 0 and masks[0].getpixel((20, 15)) == 255
    # from_dict with base_dir resolves the same way; without it, against the cwd.
    assert Layout.from_dict(data, base_dir=folder) == layout
    monkeypatch.chdir(folder)
    assert Layout.from_dict(data).instances[0].mask == "masks/bird.png"


def test_mask_rgb_is_read_as_grayscale(tmp_path):
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "m.png")
    layout = Layout.from_dict(with_("instances.1.mask", "m.png"), base_dir=tmp_path)
    assert layout.load_masks()[1].mode == "L"


def test_mask_missing(tmp_path):
    err = fails(with_("instances.1.mask", "nope.png"), "instances[1].mask", "not found", "nope.png", base_dir=tmp_path)
    assert "folder" in str(err)


def test_mask_unreadable(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    fails(with_("instances.2.mask", "broken.png"), "instances[2].mask", "cannot read", base_dir=tmp_path)


def test_mask_wrong_type():
    fails(with_("instances.0.mask", 3), "instances[0].mask", "path", "int")
    fails(with_("instances.0.mask", ""), "instances[0].mask", "empty path")
    assert Layout.from_dict(with_("instances.0.mask", None)).instances[0].mask is None


# -- files and round trips --------------------------------------------------------


def test_json_round_trip():
    layout = Layout.from_dict(good())
    assert Layout.from_json(layout.to_json()) == layout
    assert Layout.from_dict(layout.to_dict()) == layout
    assert json.loads(layout.to_json()) == layout.to_dict()
    assert layout.to_dict()["instances"][2]["box"] == [0.0, 0.0, 1.0, 1.0]
    assert "mask" not in layout.to_dict()["instances"][0]


def test_save_load_round_trip_with_mask(tmp_path):
    _mask(tmp_path / "m.png")
    layout = Layout.from_dict(with_("instances.1.mask", "m.png"), base_dir=tmp_path)
    out = layout.save(tmp_path / "sub" / ".." / "layout.json")
    written = json.loads(out.read_text())
    assert written["instances"][1]["mask"] == "m.png"  # inside the folder: stored relative
    assert Layout.load(out) == layout
    with pytest.raises(LayoutError, match="already exists.*overwrite=True"):
        layout.save(out)
    layout.save(out, overwrite=True)
    # Saved elsewhere, the mask is written as an absolute path and still loads.
    other = layout.save(tmp_path / "elsewhere" / "copy.json")
    assert Path(json.loads(other.read_text())["instances"][1]["mask"]).is_absolute()
    assert Layout.load(other) == layout


def test_load_missing_file(tmp_path):
    with pytest.raises(LayoutError, match="layout file .*missing.json: not found"):
        Layout.load(tmp_path / "missing.json")
    with pytest.raises(LayoutError, match="is a folder, not a file"):
        Layout.load(tmp_path)


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "prompt": "a park",\n  "width": 512\n  "height": 512\n}\n')
    with pytest.raises(LayoutError) as info:
        Layout.load(path)
    message = str(info.value)
    assert "line 4 column 3" in message and str(path) in message and "\n" not in message
    with pytest.raises(LayoutError, match="line 1 column"):
        Layout.from_json("{'prompt': 1}")


def test_frozen():
    layout = Layout.from_dict(good())
    with pytest.raises(Exception):
        layout.width = 64  # type: ignore[misc]


# -- bundled examples ------------------------------------------------------------


def test_examples_load_and_validate():
    names = list_examples()
    assert {"two_birds", "reading_girl", "still_life"} <= set(names) and len(names) >= 4
    sizes = {}
    for name in names:
        path = example_path(name)
        assert path.is_file() and example_path(name + ".json") == path
        layout = Layout.load(path)
        assert Layout.from_json(layout.to_json()) == layout
        sizes[name] = (layout.width, layout.height, len(layout.instances))
    assert sizes["two_birds"] == (512, 512, 2)
    assert sizes["reading_girl"] == (1024, 1024, 9)
    assert sizes["still_life"] == (768, 1024, 3)
    assert any(v == (1024, 1024, 4) for v in sizes.values())


def test_reading_girl_overlaps():
    # Its point is heavy overlap: most instances must share token cells with another one.
    layout = Layout.load(example_path("reading_girl"))
    regions = rule.box_regions(layout.boxes, *layout.grid)
    flat = regions.reshape(len(layout.instances), -1)
    overlapping = sum(bool(((flat[i] & flat).sum(1) > 0).sum() > 1) for i in range(flat.shape[0]))
    assert overlapping >= 7


def test_unknown_example():
    with pytest.raises(LayoutError, match="two_birds"):
        example_path("three_birds")


# -- limits and strict JSON (issue 10): each of these used to pass validate or end in a traceback --


def load_error(tmp_path: Path, text: str, **kwargs) -> LayoutError:
    path = tmp_path / "layout.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LayoutError) as info:
        Layout.load(path, **kwargs)
    return info.value


def small(**extra) -> dict:
    return {"prompt": "a room", "width": 64, "height": 64, **extra}


def test_json_nesting_bomb_is_one_error(tmp_path):
    err = load_error(tmp_path, "[" * 200_000 + "]" * 200_000)
    assert "nested too deeply" in str(err)
    shallow_bomb = json.dumps(small(instances=[[[[[[[[[[[]]]]]]]]]]]))  # parses, but no layout nests this deep
    assert "nested more than" in str(load_error(tmp_path, shallow_bomb))


def test_nesting_of_a_dict_from_elsewhere_is_checked_without_recursion():
    data = small()
    data["instances"] = [data]  # a cycle: only an iterative, bounded walk survives it
    with pytest.raises(LayoutError, match="nested more than"):
        Layout.from_dict(data)


def test_number_with_thousands_of_digits(tmp_path):
    err = load_error(tmp_path, '{"prompt": "a", "width": ' + "7" * 5000 + ', "height": 64}')
    assert "5000 digits" in str(err)


@pytest.mark.parametrize("width, words", [(10**31, "32 digits"), (100_000, "limit of 8192"),
                                          (16 * 10**6, "limit of 8192")])
def test_absurd_sizes_fail_validation(tmp_path, width, words):
    assert words in str(load_error(tmp_path, json.dumps(small(width=width))))


def test_pixel_limit_counts_both_sides():
    with pytest.raises(LayoutError, match="67108864 pixels"):
        Layout.from_dict(small(width=8192, height=8192))
    with pytest.raises(LayoutError, match="pixels"):
        Layout("a room", 8192, 8192)  # direct construction is held to the same limits
    assert Layout.from_dict(small(width=4096, height=4096)).width == 4096


def test_lone_surrogate_in_a_prompt(tmp_path):
    text = '{"prompt": "a room", "width": 64, "height": 64, "instances": [{"prompt": "a \\udc00 cat", ' \
           '"box": [0, 0, 1, 1]}]}'
    err = load_error(tmp_path, text)
    assert err.field == "instances[0].prompt" and "surrogate" in str(err)
    with pytest.raises(LayoutError, match="surrogate"):
        Instance("a \ud800", (0, 0, 1, 1))
    with pytest.raises(LayoutError, match="NUL"):
        Layout("a\x00room", 64, 64)


def test_prompt_and_instance_limits():
    with pytest.raises(LayoutError, match="2001 characters"):
        Layout.from_dict(small(prompt="x" * 2001))
    with pytest.raises(LayoutError, match=r"instances\[0\].prompt: is 2001 characters"):
        Layout("a room", 64, 64, (Instance("x" * 2001, (0, 0, 1, 1)),))
    two = small(instances=[{"prompt": "a", "box": [0, 0, 1, 1]}] * 2)
    with pytest.raises(LayoutError, match="at most 1 are supported"):
        Layout.from_dict(two, limits=LayoutLimits(max_instances=1))


def test_nan_constants_and_duplicate_keys_are_not_json(tmp_path):
    nan_box = '{"prompt": "a", "width": 64, "height": 64, "instances": [{"prompt": "b", "box": [NaN, 0, 1, 1]}]}'
    assert "NaN is not a JSON number" in str(load_error(tmp_path, nan_box))
    assert "Infinity" in str(load_error(tmp_path, '{"prompt": "a", "width": Infinity, "height": 64}'))
    assert "appears twice" in str(load_error(tmp_path, '{"prompt": "a", "prompt": "b", "width": 64, "height": 64}'))


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    import tracemalloc

    path = tmp_path / "huge.json"
    with path.open("wb") as handle:  # 2 GB, sparse: costs no disk, but reading it would cost 2 GB of RAM
        handle.truncate(2 * 1024**3)
    tracemalloc.start()
    try:
        with pytest.raises(LayoutError, match="larger than the limit of 1000000 bytes"):
            Layout.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_byte_limit_is_configurable_and_exact(tmp_path):
    text = json.dumps(small())
    path = tmp_path / "layout.json"
    path.write_text(text)
    assert Layout.load(path, limits=LayoutLimits(max_file_bytes=len(text))).width == 64
    with pytest.raises(LayoutError, match="larger than the limit"):
        Layout.load(path, limits=LayoutLimits(max_file_bytes=len(text) - 1))
    with pytest.raises(LayoutError, match="more than the limit"):
        Layout.from_json(text, limits=LayoutLimits(max_file_bytes=len(text) - 1))


def test_a_service_can_allow_more_and_copies_keep_the_limits():
    from dataclasses import replace

    roomy = LayoutLimits(max_side=16384, max_pixels=16384 * 1024, max_prompt_chars=5000)
    wide = Layout.from_dict(small(width=16384, height=1024, prompt="x" * 4000), limits=roomy)
    assert wide.limits == roomy and replace(wide, height=512).limits == roomy
    assert wide == Layout.from_dict(small(width=16384, height=1024, prompt="x" * 4000), limits=roomy)
    with pytest.raises(LayoutError, match="limit of 16384"):
        replace(wide, width=16400)
    with pytest.raises(ValueError, match="at most 63"):
        LayoutLimits(max_instances=64)
    with pytest.raises(ValueError, match="positive integer"):
        LayoutLimits(max_side=0)


def test_long_keys_and_values_make_short_messages():
    err_key = pytest.raises(LayoutError, Layout.from_dict, small(**{"k" * 100_000: 1})).value
    assert len(str(err_key)) < 300
    err_value = pytest.raises(LayoutError, Layout.from_dict, small(instances=[[list(range(10**5))]])).value
    assert len(str(err_value)) < 300


def test_validate_lists_limit_problems(tmp_path, capsys):
    from threedis.engine.cli import EXIT_USER_ERROR, main

    path = tmp_path / "big.json"
    path.write_text(json.dumps(small(width=100_000, height=100_000, prompt="a \udc00")))
    assert main(["validate", str(path)]) == EXIT_USER_ERROR
    out = capsys.readouterr().out
    assert "3 problems" in out and "limit of 8192" in out and "surrogate" in out
