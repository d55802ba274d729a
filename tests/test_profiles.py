"""Profiles: built-ins load, overrides convert, mistakes get one clear message."""

from __future__ import annotations

import dataclasses
import importlib.resources

import pytest

from threedis.engine.errors import UserError
from threedis.engine.profiles import (
    GIB, MODEL_KEYS, Offload, Placement, Weights, list_profiles, load_profile, parse_overrides,
    resolve_profile, select_auto_profile,
)

BUILTINS = ["8gb", "12gb", "16gb", "24gb", "cpu"]


def test_builtin_files_are_listed_smallest_first():
    files = sorted(p.name for p in importlib.resources.files("threedis.profiles").iterdir()
                   if p.name.endswith(".toml"))
    assert files == sorted(f"{n}.toml" for n in BUILTINS)
    names = list_profiles()
    assert sorted(names) == sorted(BUILTINS)
    vram = [load_profile(n).min_vram_gb for n in names]
    assert vram == sorted(vram)


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_loads_complete(name):
    p = load_profile(name)
    assert p.name == name
    assert p.description
    assert set(p.models) == set(MODEL_KEYS)
    for key in MODEL_KEYS:
        assert isinstance(p.policy(key).weights, Weights)
    assert p.uses_gpu == (name != "cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.vae_tiling = not p.vae_tiling  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.models["t5"] = p.models["clip"]  # type: ignore[index]


def test_overrides_convert_types_and_leave_original():
    base = load_profile("12gb")
    p = load_profile("12gb", {"transformer.weights": "FP8", "vae_tiling": "false",
                              "step_cache_threshold": "0.12", "transformer.offload": "group",
                              "transformer.offload_group_blocks": "3", "transformer.use_streams": "yes",
                              "attention_backend": "sdpa"})
    tp = p.policy("transformer")
    assert tp.weights is Weights.FP8 and tp.offload is Offload.GROUP
    assert tp.offload_group_blocks == 3 and tp.use_streams is True
    assert p.vae_tiling is False and p.step_cache_threshold == pytest.approx(0.12)
    assert p.attention_backend.value == "sdpa"
    assert "transformer.weights=FP8" in p.origin
    assert base.policy("transformer").weights is Weights.NF4
    assert base.vae_tiling is True


@pytest.mark.parametrize("overrides, must_contain", [
    ({"transformer.weights": "nf5"}, ["transformer.weights", "nf4", "quanto-int4", "did you mean 'nf4'"]),
    ({"t5.device": "gpu_then_freed"}, ["t5.device", "gpu-then-freed", "cpu"]),
    ({"transfomer.weights": "nf4"}, ["unknown key 'transfomer.weights'", "did you mean 'transformer.weights'"]),
    ({"vae_tilng": "true"}, ["unknown key 'vae_tilng'", "did you mean 'vae_tiling'"]),
    ({"vae_tiling": "maybe"}, ["vae_tiling", "true or false"]),
    ({"t5.offload_group_blocks": "two"}, ["t5.offload_group_blocks", "whole number"]),
    ({"step_cache": "magcach"}, ["step_cache", "did you mean 'magcache'"]),
    ({"t5.device": "cpu"}, ["t5.offload", "cpu", "nothing to offload"]),       # 12gb offloads T5
    ({"clip.device": "cpu", "clip.weights": "nf4"}, ["clip.weights", "CUDA"]),
    ({"transformer.offload_group_blocks": "0"}, ["offload_group_blocks", ">= 1"]),
    ({"step_cache_threshold": "0"}, ["step_cache_threshold", "> 0"]),
])
def test_bad_overrides_name_the_key(overrides, must_contain):
    with pytest.raises(UserError) as info:
        load_profile("12gb", overrides)
    msg = str(info.value)
    for piece in must_contain:
        assert piece in msg, msg


def test_triton_on_cpu_profile_is_refused():
    with pytest.raises(UserError, match="triton"):
        load_profile("cpu", {"attention_backend": "triton"})


def test_unknown_profile_name_suggests():
    with pytest.raises(UserError, match="did you mean '12gb'"):
        load_profile("12bg")
    assert load_profile("12GB").name == "12gb"


def test_user_file_with_base(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "16gb"\nvae_tiling = true\n[t5]\nweights = "int8"\n', encoding="utf-8")
    p = load_profile(path, {"clip.device": "gpu-then-freed"})
    base = load_profile("16gb")
    assert p.name == "mine" and p.vae_tiling is True
    assert p.policy("t5").weights is Weights.INT8
    assert p.policy("t5").device is base.policy("t5").device
    assert p.policy("clip").device is Placement.GPU_THEN_FREED
    assert p.policy("transformer") == base.policy("transformer")
    assert str(path) in p.origin


@pytest.mark.parametrize("text, must_contain", [
    ('base = "16gb"\n[tranformer]\nweights = "nf4"\n', ["unknown key 'tranformer'", "did you mean 'transformer'"]),
    ('base = "16gb"\n[t5]\nwieghts = "nf4"\n', ["t5.wieghts", "did you mean 't5.weights'"]),
    ('base = "16GB"\n', ["base", "16gb"]),
    ('min_vram_gb = 8\nvae_tiling = true\nattention_backend = "auto"\nstep_cache = "none"\n'
     'text_encoder_cache = true\n', ["missing table [transformer]"]),
    ('vae_tiling = true\n', ["missing key 'min_vram_gb'"]),
    ('base = "16gb"\nvae_tiling = \n', ["not valid TOML"]),
    ('base = "16gb"\nt5 = "int8"\n', ["'t5' must be a table"]),
])
def test_bad_user_files(tmp_path, text, must_contain):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_profile(path)
    msg = str(info.value)
    assert str(path) in msg
    for piece in must_contain:
        assert piece in msg, msg


def test_parse_overrides():
    assert parse_overrides(["a.b=1", " vae_tiling = false "]) == {"a.b": "1", "vae_tiling": "false"}
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["vae_tiling"])


def test_auto_picks_largest_fitting_profile():
    gpu = sorted((load_profile(n) for n in BUILTINS if n != "cpu"), key=lambda p: p.min_vram_gb)
    for i, p in enumerate(gpu):
        picked, reason = select_auto_profile(int(p.min_vram_gb * GIB) + 1)
        assert picked.name == p.name, reason
        below = gpu[i - 1].name if i else "cpu"
        assert select_auto_profile(int(p.min_vram_gb * GIB) - 1)[0].name == below
    assert select_auto_profile(80 * GIB)[0].name == gpu[-1].name
    assert select_auto_profile(None)[0].name == "cpu"
    assert select_auto_profile(0)[0].name == "cpu"


def test_auto_reason_reads_well():
    profile, reason = select_auto_profile(int(13.1 * GIB), 16 * GIB)
    assert profile.name == "12gb"
    assert reason.startswith("picked 12gb: 13.1 GB free of 16.0 GB")
    assert "16gb needs" in reason


def test_resolve_profile_on_cpu():
    p = resolve_profile("auto", "cpu", {"vae_tiling": "false"})
    assert p.name == "cpu" and p.vae_tiling is False
    assert p.origin.startswith("auto: picked cpu")
    with pytest.raises(UserError, match="--profile cpu"):
        resolve_profile("12gb", "cpu")
    assert resolve_profile("cpu", "cpu").name == "cpu"
