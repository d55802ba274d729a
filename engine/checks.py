"""Checks of render arguments, so every user mistake becomes one UserError.

Engine.render and the CLI call these before any work, so a bad seed, guidance
value, schedule, device or callback is reported in one line that says what to
change, instead of as an AssertionError deep in torch or, worse, a black image
saved as success. Layout files have their own checks (threedis.engine.layout).
torch is imported only by the checks that need it (schedule, parse_device), so the
CLI can make the others before it imports torch.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

from threedis.engine.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "GUIDANCE_MAX",
    "LORA_SCALE_MAX",
    "MAX_STEPS",
    "SEED_MAX",
    "check_callback",
    "check_cancel",
    "check_chunk",
    "check_guidance",
    "check_lora_scale",
    "check_render_args",
    "check_schedule",
    "check_seed",
    "check_steps",
    "device_type",
    "no_cuda_message",
    "parse_device",
]

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit unsigned seed
# FLUX.1-dev models are distilled for guidance around 1..10; far above, the embedding overflows to NaN.
GUIDANCE_MAX = 100.0
MAX_STEPS = 1000  # far beyond any useful flow-matching schedule; bounds a typo or tampered metadata
CHUNK_MAX = 512  # T5 tokens per prompt: FLUX's T5 sequence length (encoding.T5_MAX_LENGTH)
# LoRAs are trained for scales around 1; far beyond, bf16 activations overflow into a black image.
LORA_SCALE_MAX = 100.0


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _is_whole(value: Any) -> bool:
    """Python or numpy integers; bool is not a number here (True as a seed is a mistake)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_seed(seed: Any, name: str = "seed") -> int:
    """A whole number in 0..2^64-1; 1.7 is an error, not silently seed 1."""
    if not _is_whole(seed):
        if _is_real(seed) and float(seed).is_integer():
            hint = f"; write {int(seed)}"
        else:
            hint = ""
        raise UserError(f"{name} must be a whole number in 0..{SEED_MAX}, got {_type_name(seed)} {seed!r}{hint}")
    seed = int(seed)
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"{name} = {seed} is outside 0..{SEED_MAX} (2^64 - 1); choose a seed in that range")
    return seed


def check_guidance(value: Any, name: str = "guidance", high: float = GUIDANCE_MAX) -> float:
    """A finite number in 0..high: NaN, Inf or 1e308 would give a black image, not an error."""
    if not _is_real(value):
        raise UserError(f"{name} must be a number, got {_type_name(value)} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise UserError(f"{name} is {number!r}; give a finite number such as 3.5 or 10")
    if not 0.0 <= number <= high:
        raise UserError(f"{name} = {number:g} is outside 0..{high:g}; typical values are 3.5 to 10")
    return number


def check_lora_scale(value: Any, name: str = "LoRA scale") -> float:
    """A finite number in -LORA_SCALE_MAX..LORA_SCALE_MAX: the range an image's metadata may record.

    One range for load_lora, the CLI, batch lines, the service and `render --from`, so a
    scale that renders can always be rendered again from its image.
    """
    if not _is_real(value):
        raise UserError(f"{name} must be a number, got {_type_name(value)} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise UserError(f"{name} is {number!r}; give a finite number in -{LORA_SCALE_MAX:g}..{LORA_SCALE_MAX:g}")
    if not -LORA_SCALE_MAX <= number <= LORA_SCALE_MAX:
        raise UserError(f"{name} = {number:g} is outside -{LORA_SCALE_MAX:g}..{LORA_SCALE_MAX:g}; LoRAs are made for "
                        f"scales around 1 (0 turns one off)")
    return number


def check_steps(value: Any, name: str = "steps", low: int = 1) -> int:
    if not _is_whole(value) or not low <= int(value) <= MAX_STEPS:
        raise UserError(f"{name} must be a whole number in {low}..{MAX_STEPS}, got {_type_name(value)} {value!r}")
    return int(value)


def check_chunk(value: Any) -> int:
    if not _is_whole(value) or not 1 <= int(value) <= CHUNK_MAX:
        raise UserError(f"chunk must be a whole number of T5 tokens in 1..{CHUNK_MAX}, got {_type_name(value)} "
                        f"{value!r}")
    return int(value)


def check_schedule(schedule: Any, steps: int) -> None:
    """A Schedule (not a dict) whose switch counts fit in `steps`: a count above it means a typo."""
    if schedule is None:
        return
    from threedis.kernels.rule import Schedule  # torch: only when there is a schedule to check

    if not isinstance(schedule, Schedule):
        raise UserError(f"schedule must be a threedis.kernels.rule.Schedule, got {_type_name(schedule)}; "
                        f"build one with Schedule(steps=..., hard=..., i2i=..., i2t=..., t2i=..., t2t=...)")
    if schedule.steps != steps:
        raise UserError(f"schedule.steps = {schedule.steps} but steps = {steps}; make them equal")
    for name in ("hard", "i2i", "i2t", "t2i", "t2t"):
        value = getattr(schedule, name)
        if value > steps:
            default = "" if value != getattr(Schedule, name) else \
                " (Schedule's defaults are for 20 steps: give every switch, or use default_schedule(steps))"
            raise UserError(f"schedule.{name} = {value} is more than steps = {steps}; a switch is on for its "
                            f"first N steps, so give at most {steps}{default}")


def check_cancel(cancel: Any) -> None:
    """None or an event (threading.Event, multiprocessing.Event): something whose is_set() can be asked."""
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise UserError(f"cancel must be a threading.Event (or None), got {_type_name(cancel)} {cancel!r}; "
                        f"pass cancel=threading.Event() and call .set() on it to stop")


def check_callback(value: Any, name: str) -> None:
    if value is not None and not callable(value):
        raise UserError(f"{name} must be a function (or None), got {_type_name(value)} {value!r}")


def check_render_args(
    *,
    steps: Any,
    seed: Any,
    guidance: Any,
    schedule: Any = None,
    chunk: Any = 200,
    cancel: Any = None,
    on_step: Any = None,
    on_stage1_step: Any = None,
) -> None:
    """Every numeric and callback argument of Engine.render, in the order a user would fix them.

    Stage 1's settings check themselves when a Stage1Options is made (with the same checks).
    """
    steps = check_steps(steps)
    check_seed(seed)
    check_guidance(guidance)
    check_schedule(schedule, steps)
    check_chunk(chunk)
    check_cancel(cancel)
    check_callback(on_step, "on_step")
    check_callback(on_stage1_step, "on_stage1_step")


# ------------------------------------------------------------------ devices


def parse_device(device: Any, flag: str = "--device") -> torch.device:
    """A device string or torch.device -> a torch.device this machine has; None -> cuda if present, else cpu.

    One place for Engine and CLI, so `--device cuda` on a machine without CUDA says so
    instead of failing an assertion inside torch at the first tensor.
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str):
        try:
            parsed = torch.device(device.strip())
        except (RuntimeError, ValueError):
            raise UserError(f"{flag} {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    else:
        raise UserError(f"{flag} must be a device name such as 'cpu' or 'cuda', got {_type_name(device)} {device!r}")
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(no_cuda_message(device, flag))
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"{flag} {device}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                            f"(cuda:0..cuda:{count - 1})")
        return parsed
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{flag} {device}: Apple MPS is not available on this machine; use {flag} cpu")
        return parsed
    raise UserError(f"{flag} {device}: threedis renders on cpu, cuda or mps, not {parsed.type}")


def no_cuda_message(device: Any, flag: str = "--device") -> str:
    return f"{flag} {device}: CUDA is not available on this machine; use {flag} cpu"


def device_type(device: Any) -> str | None:
    """The kind of a device without importing torch: "cuda:1" -> "cuda", a torch.device -> its type.

    None for None (the engine's default) and for text that is no device name (parse_device says why).
    """
    if device is None:
        return None
    kind = getattr(device, "type", None)
    if isinstance(kind, str):
        return kind
    if not isinstance(device, str):
        return None
    name, _, index = device.strip().lower().partition(":")
    return name if name.isalpha() and (not index or index.isdigit()) else None
