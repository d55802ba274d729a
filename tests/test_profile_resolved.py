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
            "ldm3d_unet": "fp32 cpu none 1 false", "ldm3d_vae": "fp32 cpu none 1 false",
            "ldm3d_text": "fp32 cpu none 1 false", "sam2": "fp32 cpu none 1 false",
            "depth_estimator": "fp32 cpu none 1 false",
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
