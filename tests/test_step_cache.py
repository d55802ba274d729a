"""Step cache (diffusers' first-block / MagCache / TaylorSeer hooks) on the tiny checkpoint, CPU.

References are independent of the runner under test: the same engine without a step cache
(fp32, exact), and block computations counted by plain torch forward hooks on every block's
attention projection (a block the cache skips never runs its projections).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import pytest
import torch

from threedis.engine.api import Engine
from threedis.engine.errors import UserError
from threedis.engine.layout import Instance, Layout
from threedis.engine.step_cache import StepCacheRunner
from threedis.kernels.rule import Schedule
from threedis.engine.api import RenderOptions

STEPS = 20
CHUNK = 16
# The tiny model's first block changes by 5-40% per step: 0.2 makes first-block reuse about
# half of the steps (measured 9 of 20) without being a different model.
FIRST_BLOCK = {"step_cache": "first-block", "step_cache_threshold": 0.2}


def birds() -> Layout:
    return Layout("a garden at dawn", 64, 64, (
        Instance("a red bird", (0.1, 0.2, 0.5, 0.8)),
        Instance("a blue jay", (0.5, 0.1, 0.9, 0.7)),
    ))


def engine_with(tiny_flux_dir, cache_dir, **overrides) -> Engine:
    return Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=cache_dir,
                                  dtype=torch.float32, overrides={"step_cache": "none", **overrides})


@contextlib.contextmanager
def block_calls(transformer) -> Iterator[list[str]]:
    """Names of the blocks whose attention really ran, in call order."""
    calls: list[str] = []
    handles = []
    for list_name in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, list_name)):
            handles.append(block.attn.to_q.register_forward_pre_hook(
                lambda m, a, name=f"{list_name}.{i}": calls.append(name)))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.float64)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("step-cache")


@pytest.fixture
def plain(tiny_flux_dir, cache_dir, depth_image_64):
    engine = engine_with(tiny_flux_dir, cache_dir)
    with block_calls(engine.components.transformer) as calls:
        result = engine.render(birds(), depth=depth_image_64, steps=STEPS, seed=1, options=RenderOptions(chunk=CHUNK))
    return result, list(calls)


def test_first_block_cache_skips_blocks_deterministically_with_bounded_change(tiny_flux_dir, cache_dir,
                                                                              depth_image_64, plain):
    base, base_calls = plain
    engine = engine_with(tiny_flux_dir, cache_dir, **FIRST_BLOCK)
    transformer = engine.components.transformer
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert len(base_calls) == STEPS * blocks  # without a cache every block runs every step

    with block_calls(transformer) as calls:
        first = engine.render(birds(), depth=depth_image_64, steps=STEPS, seed=1, options=RenderOptions(chunk=CHUNK))
    info = first.settings["step_cache"]
    computed, reused = info["computed_steps"], info["reused_steps"]
    print(f"first-block 0.2: computed {computed}, reused {reused}; block calls {len(calls)} vs {len(base_calls)}")
    assert sorted(computed + reused) == list(range(STEPS)) and reused
    # a reused step runs only the first double block
    assert len(calls) == blocks * len(computed) + len(reused)
    assert calls.count("transformer_blocks.0") == STEPS

    again = engine.render(birds(), depth=depth_image_64, steps=STEPS, seed=1, options=RenderOptions(chunk=CHUNK))
    assert np.array_equal(pixels(again), pixels(first))  # hook state is reset per render
    assert again.settings["step_cache"]["reused_steps"] == reused

    diff = np.abs(pixels(first) - pixels(base))
    print(f"vs uncached: mean {diff.mean():.3f}, max {diff.max():.0f} (of 255)")
    assert 0 < diff.mean() < 2.0 and diff.max() < 32


def test_cache_passes_our_attention_rule_through(tiny_flux_dir, cache_dir, depth_image_64, monkeypatch):
    from threedis.engine.processor import MaskedFluxAttnProcessor

    seen: list[bool] = []
    original = MaskedFluxAttnProcessor.__call__

    def spy(self, attn, hidden_states, *args, threedis=None, **kwargs):
        seen.append(threedis is not None and threedis.tokens is not None and threedis.phases is not None)
        return original(self, attn, hidden_states, *args, threedis=threedis, **kwargs)

    monkeypatch.setattr(MaskedFluxAttnProcessor, "__call__", spy)
    engine = engine_with(tiny_flux_dir, cache_dir, **FIRST_BLOCK)
    engine.render(birds(), depth=depth_image_64, steps=STEPS, seed=1, options=RenderOptions(chunk=CHUNK))
    assert seen and all(seen)  # every attention call that ran got the masked rule


@pytest.mark.parametrize("kind, threshold", [("first-block", 0.2), ("magcache", 0.3), ("taylorseer", 0.05)])
def test_each_kind_survives_text_and_rule_changes(tiny_flux_dir, cache_dir, depth_image_64, kind, threshold):
    """The hard-control window ends at step 10: the text shrinks to the global chunk and attention
    turns plain. A residual cached before must not be reused after: step 10 always computes."""
    schedule = Schedule(steps=STEPS, hard=10, i2i=3, i2t=STEPS, t2i=STEPS, t2t=STEPS)
    engine = engine_with(tiny_flux_dir, cache_dir, step_cache=kind, step_cache_threshold=threshold)
    runs = [engine.render(birds(), depth=depth_image_64, steps=STEPS, seed=2, options=RenderOptions(chunk=CHUNK), schedule=schedule)
            for _ in range(2)]
    info = runs[0].settings["step_cache"]
    print(kind, info)
    assert info["segments"] == 3  # steps 0-2, 3-9, 10-19
    assert {0, 3, 10} <= set(info["computed_steps"]) and info["reused_steps"]
    assert np.array_equal(pixels(runs[0]), pixels(runs[1]))


def test_unknown_kind_and_missing_threshold_are_user_errors():
    with pytest.raises(UserError, match="first-block"):
        StepCacheRunner("fastest", 0.1)
    with pytest.raises(UserError, match="threshold"):
        StepCacheRunner("magcache", 0.0)
    assert not StepCacheRunner("none", 0.0).enabled
