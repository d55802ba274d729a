"""Strict reading of the settings a render stores in its image.png (`render --from`, rerender_from_png).

Why strict: the PNG may come from anywhere (a forum post, a tampered file), so its
metadata is user input like a layout file. Every key the engine reads is checked for
type and range with the same limits as a render call, unknown keys are refused, and
nothing in it names a file: masks, depth and LoRAs are taken from the files saved
beside the image (see outputs.rerender_from_png), never from paths in the text.
Informational keys (device, dtype, placement, ...) are type-checked and kept.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from threedis.engine.checks import CHUNK_MAX, GUIDANCE_MAX, LORA_SCALE_MAX, MAX_STEPS, SEED_MAX as MAX_SEED
from threedis.engine.errors import UserError

__all__ = ["MAX_METADATA_BYTES", "MAX_STEPS", "MetadataError", "parse_metadata", "parse_metadata_text"]

MAX_METADATA_BYTES = 1 << 20  # a layout of the largest allowed size is far below this
BACKENDS = ("auto", "triton", "flex", "sdpa")
DEPTH_SOURCES = ("stage1", "user", "photo")
MASK_SOURCES = ("box", "user", "sam")


class MetadataError(UserError):
    """The image's threedis metadata is malformed or altered; says which key and what was wrong."""


Check = Callable[[str, Any], Any]


def _fail(key: str, what: str, value: Any) -> MetadataError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return MetadataError(f"threedis metadata: {key} must be {what}, got {shown}; the image was altered or written "
                         f"by another version")


def _int(low: int, high: int) -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _fail(key, f"a whole number in {low}..{high}", value)
        return value
    return check


def _float(low: float, high: float) -> Check:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            raise _fail(key, f"a number in {low}..{high}", value)
        return float(value)
    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)
    return value


def _text(max_len: int = 4096, optional: bool = False) -> Check:
    def check(key: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > max_len:
            raise _fail(key, f"text of at most {max_len} characters", value)
        return value
    return check


def _optional(check: Check) -> Check:
    """`check`, or null (the setting's default)."""
    def optional(key: str, value: Any) -> Any:
        return None if value is None else check(key, value)
    return optional


def _choice(options: tuple[str, ...]) -> Check:
    def check(key: str, value: Any) -> str:
        if value not in options:
            raise _fail(key, "one of " + ", ".join(options), value)
        return value
    return check


def _json_value(depth: int = 4) -> Check:
    """Informational data (placement, report notes): plain JSON of bounded depth, kept as it is."""
    def check(key: str, value: Any, level: int = 0) -> Any:
        if level > depth:
            raise _fail(key, f"plain data nested at most {depth} deep", "...")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [check(f"{key}[{i}]", item, level + 1) for i, item in enumerate(value)]
        if isinstance(value, dict):
            return {str(k): check(f"{key}.{k}", v, level + 1) for k, v in value.items()}
        raise _fail(key, "plain JSON data", value)
    return check


def _mapping(fields: dict[str, Check], key: str, value: Any, required: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        raise _fail(key, "an object", value)
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise MetadataError(f"threedis metadata: {key} has unknown key {unknown[0]!r}; the image was altered or "
                            f"written by another version")
    missing = [k for k in required if k not in value]
    if missing:
        raise MetadataError(f"threedis metadata lacks {key}.{missing[0]}; it was written by another version")
    return {k: fields[k](f"{key}.{k}", v) for k, v in value.items()}


def _schedule(key: str, value: Any) -> dict:
    step = _int(0, MAX_STEPS)
    return _mapping({k: step for k in ("steps", "hard", "i2i", "i2t", "t2i", "t2t")}, key, value, ("steps",))


def _stage1_depth(key: str, value: Any) -> dict:
    size = _int(8, 4096)

    def pair(k: str, v: Any) -> list[int]:
        if not isinstance(v, list) or len(v) != 2:
            raise _fail(k, "a [width, height] pair", v)
        return [size(f"{k}[0]", v[0]), size(f"{k}[1]", v[1])]

    fields: dict[str, Check] = {
        "source": _choice(DEPTH_SOURCES), "model": _text(optional=True), "photo": _text(optional=True),
        "steps": _int(1, MAX_STEPS), "guidance": _float(0.0, GUIDANCE_MAX), "migc_steps": _int(0, MAX_STEPS),
        "phase_augment": _bool, "size": pair, "seed": _int(0, MAX_SEED), "refine_steps": _optional(_int(0, MAX_STEPS)),
        "negative_prompt": _text(optional=True), "prompt": _text(20_000, optional=True),
    }
    return _mapping(fields, key, value, ("source",))


def _list_of(item: Check, max_len: int) -> Check:
    def check(key: str, value: Any) -> list:
        if not isinstance(value, list) or len(value) > max_len:
            raise _fail(key, f"a list of at most {max_len} items", value)
        return [item(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return check


def _lora(key: str, value: Any) -> dict:
    scale = _float(-LORA_SCALE_MAX, LORA_SCALE_MAX)  # the range load_lora accepts (checks.check_lora_scale)
    return _mapping({"path": _text(), "scale": scale, "name": _text(256)}, key, value, ("path",))


def _sam(key: str, value: Any) -> dict:
    return _mapping({"ran": _bool, "model": _text(optional=True)}, key, value, ("ran",))


def _str_map(key: str, value: Any) -> dict:
    if not isinstance(value, dict) or len(value) > 256:
        raise _fail(key, "an object of at most 256 entries", value)
    return {_text(256)(f"{key} key", k): _json_value(1)(f"{key}.{k}", v) for k, v in value.items()}


def _layout(key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise _fail(key, "an object (the layout)", value)
    return value  # the layout parser checks it in full (with its limits) when it is built


FIELDS: dict[str, Check] = {
    "layout": _layout, "seed": _int(0, MAX_SEED), "steps": _int(1, MAX_STEPS), "guidance": _float(0.0, GUIDANCE_MAX),
    "schedule": _schedule, "chunk": _int(1, CHUNK_MAX), "append_instances": _bool, "permute_tokens": _bool,
    "backend": _choice(BACKENDS), "depth": _stage1_depth, "sam": _sam, "masks": _list_of(_choice(MASK_SOURCES), 64),
    "loras": _list_of(_lora, 16), "overrides": _str_map, "vae_tiling": _bool, "model": _text(),
    # informational: what the render ran on and said; checked for shape, not used to render
    "backend_reason": _text(), "profile": _text(256), "profile_origin": _text(), "placement": _json_value(),
    "step_cache": _json_value(), "device": _text(64), "dtype": _text(64), "truncated_prompts": _json_value(),
    "version": _text(64), "warnings": _list_of(_text(), 256), "rerendered_from": _text(),
}
REQUIRED = ("layout", "seed", "steps", "guidance", "schedule", "chunk", "append_instances", "permute_tokens")


def parse_metadata(meta: Any) -> dict:
    """Checked copy of decoded metadata: every key known, typed and in range, else one MetadataError line."""
    return _mapping(FIELDS, "metadata", meta, REQUIRED)


def parse_metadata_text(text: str) -> dict:
    """The PNG text chunk -> checked metadata; size and nesting are bounded before decoding."""
    if len(text) > MAX_METADATA_BYTES:
        raise MetadataError(f"threedis metadata is {len(text)} characters (at most {MAX_METADATA_BYTES}); the image "
                            f"was altered")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise MetadataError(f"threedis metadata is not valid JSON ({reason})") from None
    return parse_metadata(meta)
