"""The shipped profiles resolve to exactly the recipes they were written as.

The table below is written by hand (from the profile files as they were before the
defaults moved into code), not computed: if a default changes, or a profile file
loses a line it needed, a value here stops matching.
"""

from __future__ import annotations

import pytest

from threedis.engine.profiles import MODEL_KEYS, load_profile

# model -> "weights device offload offload_group_blocks use_streams"
_GPU_AUX = {
    "ldm3d_unet": "fp16 gpu-then-freed none 1 false",
    "ldm3d_vae": "fp32 gpu-then-freed none 1 false",
    "ldm3d_text": "fp16 gpu-then-freed none 1 false",
    "sam2": "bf16 gpu-then-freed none 1 false",
    "depth_estimator": "bf16 gpu-then-freed none 1 false",
}
_GPU_DECODE = {"clip": "bf16 gpu none 1 false", "vae": "bf16 gpu none 1 false"}

EXPECTED = {
    "8gb": {
        "top": dict(min_vram_gb=7.0, vae_tiling=True, attention_backend="auto", step_cache="first-block",
                    step_cache_threshold=0.05, text_encoder_cache=True),
        "models": {"transformer": "nf4 gpu group 4 true", "t5": "nf4 gpu model 1 false", **_GPU_DECODE, **_GPU_AUX},
    },
    "12gb": {
        "top": dict(min_vram_gb=10.5, vae_tiling=True, attention_backend="auto", step_cache="first-block",
                    step_cache_threshold=0.05, text_encoder_cache=True),
        "models": {"transformer": "nf4 gpu model 1 false", "t5": "int8 gpu model 1 false", **_GPU_DECODE,
                   **_GPU_AUX},
    },
    "16gb": {
        "top": dict(min_vram_gb=14.5, vae_tiling=False, attention_backend="auto", step_cache="none",
                    step_cache_threshold=0.0, text_encoder_cache=True),
        "models": {"transformer": "fp8 gpu group 4 true", "t5": "bf16 gpu-then-freed none 1 false", **_GPU_DECODE,
                   **_GPU_AUX},
    },
    "24gb": {
        "top": dict(min_vram_gb=22.0, vae_tiling=False, attention_backend="auto", step_cache="none",
                    step_cache_threshold=0.0, text_encoder_cache=True),
        "models": {"transformer": "fp8 gpu none 1 false", "t5": "int8 gpu-then-freed none 1 false", **_GPU_DECODE,
                   **_GPU_AUX},
    },
    "cpu": {
        "top": dict(min_vram_gb=0.0, vae_tiling=True, attention_backend="auto", step_cache="first-block",
                    step_cache_threshold=0.08, text_encoder_cache=True),
        "models": {
            "transformer": "bf16 cpu none 1 false", "t5": "bf16 cpu none 1 false",
            "clip": "fp32 cpu none 1 false", "vae": "fp32 cpu none 1 false",
            # The file said "cpu" for these, but the code always freed them after their stage;
            # now that "cpu" means "kept loaded", the profile states what it always did.
            "ldm3d_unet": "fp32 cpu-then-freed none 1 false", "ldm3d_vae": "fp32 cpu-then-freed none 1 false",
            "ldm3d_text": "fp32 cpu-then-freed none 1 false", "sam2": "fp32 cpu-then-freed none 1 false",
            "depth_estimator": "fp32 cpu-then-freed none 1 false",
        },
    },
}


def _row(policy) -> str:
    return (f"{policy.weights.value} {policy.device.value} {policy.offload.value} "
            f"{policy.offload_group_blocks} {str(policy.use_streams).lower()}")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_profile_resolves_to_its_recipe(name):
    profile = load_profile(name)
    expected = EXPECTED[name]
    got_top = {k: profile.to_dict()[k] for k in expected["top"]}
    assert got_top == expected["top"]
    assert set(expected["models"]) == set(MODEL_KEYS)
    got = {k: _row(profile.policy(k)) for k in MODEL_KEYS}
    assert got == expected["models"]
    assert profile.name == name and profile.description


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_files_state_only_decisions(name):
    """No table repeats a default: what a file says is what that recipe decided."""
    import importlib.resources
    import tomllib

    from threedis.engine.profiles import MODEL_DEFAULTS, TOP_DEFAULTS

    text = importlib.resources.files("threedis.profiles").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    policy_defaults = {"offload": "none", "offload_group_blocks": 1, "use_streams": False}
    for key, value in data.items():
        if key in MODEL_KEYS:
            defaults = {**policy_defaults, **MODEL_DEFAULTS.get(key, {})}
            repeated = [k for k, v in value.items() if k in defaults and defaults[k] == v]
            assert not repeated, (key, repeated)
        elif key in TOP_DEFAULTS:
            assert value != TOP_DEFAULTS[key], key


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_resolved_text_loads_back_to_the_same_profile(name, tmp_path):
    from threedis.engine.profiles import resolved_toml

    profile = load_profile(name)
    path = tmp_path / "copy.toml"
    path.write_text(resolved_toml(profile), encoding="utf-8")
    again = load_profile(path).to_dict()
    original = profile.to_dict()
    for d in (again, original):
        d.pop("name"), d.pop("origin")
    assert again == original


def test_a_user_file_needs_only_its_decisions(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text('min_vram_gb = 9\nvae_tiling = false\n[transformer]\nweights = "nf4"\ndevice = "gpu"\n'
                    '[t5]\nweights = "int8"\ndevice = "gpu-then-freed"\n', encoding="utf-8")
    p = load_profile(path)
    assert (p.attention_backend.value, p.step_cache.value, p.text_encoder_cache) == ("auto", "none", True)
    assert _row(p.policy("clip")) == "bf16 gpu none 1 false"
    assert _row(p.policy("ldm3d_vae")) == "fp32 gpu-then-freed none 1 false"
    assert _row(p.policy("transformer")) == "nf4 gpu none 1 false"


def test_profiles_command_lists_and_shows_resolved(capsys):
    from threedis.engine.cli import main

    assert main(["profiles"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == ["cpu", "8gb", "12gb", "16gb", "24gb", "auto"]
    assert main(["profiles", "--show", "12gb", "--set", "sam2.weights=fp32"]) == 0
    shown = capsys.readouterr().out
    # defaults the 12gb file does not write, and the override
    assert '[clip]\nweights = "bf16"\ndevice = "gpu"\noffload = "none"' in shown
    assert 'attention_backend = "auto"' in shown and 'text_encoder_cache = true' in shown
    assert '[sam2]\nweights = "fp32"\ndevice = "gpu-then-freed"' in shown
    assert main(["profiles", "--show", "12bg"]) == 2
    assert "did you mean '12gb'" in capsys.readouterr().err
