"""Optional step cache: reuse transformer work between denoising steps (per profile).

Why: on slow cards (and on the CPU) a FLUX step costs seconds; consecutive steps
often change the transformer's internals so little that most of a step can be
reused. diffusers 0.42 ships the hooks; this module only picks the config, applies
it to our transformer (with MaskedFluxAttnProcessor installed), and feeds the hooks
the cache context they need.

Kinds (profile key `step_cache`, tuned by `step_cache_threshold`):
  first-block  diffusers FirstBlockCache: run the first double block; when its
               residual changed by less than `threshold` (relative mean abs) since
               the last full step, skip every other block and add the cached tail
               residuals instead.
  magcache     diffusers MagCache with FLUX.1-dev's magnitude ratios
               (`FLUX_MAG_RATIOS`, calibrated on FLUX.1-dev, an approximation for
               the depth fine-tune): skip whole steps while the accumulated
               predicted error stays under `threshold` (at most 3 in a row, never in
               the first 20% of steps).
  taylorseer   diffusers TaylorSeer in lite mode: every block is skipped on
               prediction steps and only `proj_out`'s output is extrapolated
               (first order; full compute for 3 warm-up steps, then every 5th
               step). The full mode caches every attention output (about 8 GB at
               1024^2 for FLUX), which defeats a low-VRAM profile. `threshold` is
               not used by this kind.

Composition with our processor: all three hooks wrap block or module forwards
and pass *args/**kwargs through, so `joint_attention_kwargs={"threedis": ...}`
reaches MaskedFluxAttnProcessor unchanged (tests/test_step_cache.py runs each).
What they cannot know is that our text length and attention rule change during
a render (the hard-control window, the phase switches): a residual cached under
one rule would be added under another, and a text residual of N+1 chunks would
be added to one chunk. So every run of steps with the same text length and
phases is a *segment*; first-block and TaylorSeer get a fresh cache context per
segment (the first step of a segment always computes), MagCache (whose step
counter indexes its ratios) keeps one context and drops its cached residual at a
segment boundary, which forces that step to compute.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator

import torch

from threedis.engine.errors import UserError
from threedis.engine.profiles import StepCache

__all__ = ["StepCacheRunner", "StepStats"]

_MAG_LEADER_HOOK = "mag_cache_leader_block_hook"  # diffusers.hooks.mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK
TAYLOR_INTERVAL = 5     # diffusers' default: full compute every 5th step after warm-up
TAYLOR_WARMUP = 3       # diffusers' default: full compute for the first 3 steps of a segment


@dataclass
class StepStats:
    """Which steps of the last render ran the whole transformer."""

    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    segments: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"computed_steps": list(self.computed), "reused_steps": list(self.reused),
                "segments": self.segments}


def _config(kind: StepCache, threshold: float, steps: int) -> Any:
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if kind is StepCache.FIRST_BLOCK:
        return FirstBlockCacheConfig(threshold=threshold)
    if kind is StepCache.MAGCACHE:
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS.clone())
    if kind is StepCache.TAYLORSEER:
        return TaylorSeerCacheConfig(cache_interval=TAYLOR_INTERVAL, disable_cache_before_step=TAYLOR_WARMUP,
                                     max_order=1, taylor_factors_dtype=torch.float32, use_lite_mode=True)
    raise AssertionError(kind)


def _tail_probe(transformer: torch.nn.Module) -> torch.nn.Module:
    """A module inside the last block that runs only when the step is really computed."""
    blocks = getattr(transformer, "single_transformer_blocks", None) or getattr(transformer, "transformer_blocks", None)
    if not blocks:
        raise UserError(f"step cache: {type(transformer).__name__} has no transformer blocks to cache")
    return blocks[-1].attn.to_q


class StepCacheRunner:
    """Applies one profile's step cache to a transformer and drives its state during renders.

    One runner per engine (no module state). `prepare(transformer, steps)` at render start
    (re-applies the hooks if the transformer or the step count changed, then resets their
    state), `step(i, key)` around each transformer call (key: what makes a segment).
    """

    def __init__(self, kind: StepCache | str, threshold: float) -> None:
        try:
            self.kind = StepCache(kind)
        except ValueError:
            allowed = ", ".join(k.value for k in StepCache)
            raise UserError(f"step_cache = {kind!r} is not allowed; choose one of {allowed}") from None
        if self.kind is not StepCache.NONE and threshold <= 0:
            raise UserError(f"step_cache = {self.kind.value!r} needs step_cache_threshold > 0 (e.g. 0.05)")
        self.threshold = float(threshold)
        self.stats = StepStats()
        self._model: Any = None            # weak use only: the transformer the hooks are on
        self._steps: int | None = None
        self._probe_handle: Any = None
        self._probe_calls = 0
        self._segment_key: Hashable = None
        self._segment = 0

    @property
    def enabled(self) -> bool:
        return self.kind is not StepCache.NONE

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "threshold": self.threshold if self.enabled else None,
                **self.stats.to_dict()}

    # -- applying ------------------------------------------------------------------------------

    def prepare(self, transformer: torch.nn.Module, steps: int) -> None:
        """Hooks on `transformer` for a render of `steps` steps, with fresh state."""
        self.stats = StepStats()
        self._segment_key, self._segment = None, 0
        if not self.enabled:
            return
        # MagCache's config holds the step count; the others are re-applied only for a new model.
        stale = self._model is not transformer or (self.kind is StepCache.MAGCACHE and self._steps != steps)
        if stale:
            self._detach()
            if getattr(transformer, "is_cache_enabled", False):
                transformer.disable_cache()
            try:
                transformer.enable_cache(_config(self.kind, self.threshold, steps))
            except (ValueError, TypeError) as exc:
                raise UserError(f"step_cache = {self.kind.value!r} cannot be applied to "
                                f"{type(transformer).__name__}: {exc}; set step_cache = 'none'") from None
            self._probe_handle = _tail_probe(transformer).register_forward_pre_hook(self._count)
            self._model, self._steps = transformer, steps
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks(recurse=True)

    def release(self) -> None:
        """Forget the transformer (it is being freed); its hooks die with it."""
        self._detach()
        self._model = self._steps = None

    def _detach(self) -> None:
        if self._probe_handle is not None:
            self._probe_handle.remove()
            self._probe_handle = None

    def _count(self, module: Any, args: Any) -> None:
        self._probe_calls += 1

    # -- per step ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, index: int, key: Hashable) -> Iterator[None]:
        """Around one transformer call: the cache context of this step's segment."""
        if not self.enabled or self._model is None:
            yield
            return
        new_segment = key != self._segment_key or self.stats.segments == 0
        if new_segment:
            self._segment_key = key
            self._segment += 1
            self.stats.segments += 1
        name = "render" if self.kind is StepCache.MAGCACHE else f"segment-{self._segment}"
        before = self._probe_calls
        with self._model.cache_context(name, step_index=index):
            if new_segment and self.kind is StepCache.MAGCACHE:
                self._drop_mag_residual()
            yield
        (self.stats.computed if self._probe_calls > before else self.stats.reused).append(index)

    def _drop_mag_residual(self) -> None:
        """Make MagCache compute this step: it never skips without a cached residual."""
        from diffusers.hooks import HookRegistry

        for module in self._model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            hook = registry.get_hook(_MAG_LEADER_HOOK) if isinstance(registry, HookRegistry) else None
            if hook is not None:
                state = hook.state_manager.get_state()
                state.previous_residual = None
                state.accumulated_ratio, state.accumulated_err, state.accumulated_steps = 1.0, 0.0, 0
