"""The user's layout (SPEC section 1): a global prompt, an image size and N boxed instances.

A layout is the engine's only user-written input, so every way it can be wrong
is caught here, at construction, with one line that names the field (as a JSON
path such as `instances[2].box`) and says what to change. Nothing downstream
re-checks it.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from threedis.engine.errors import UserError
from threedis.engine.paths import file_problem

# The attention rule's limit (threedis.kernels.rule.MAX_INSTANCES), restated so that validating a
# layout never imports torch; tests/test_layout.py checks that the two agree.
MAX_INSTANCES = 63

__all__ = [
    "DEFAULT_LAYOUT_LIMITS",
    "Instance",
    "Layout",
    "LayoutError",
    "LayoutLimits",
    "MAX_INSTANCES",
    "SIZE_MULTIPLE",
    "example_path",
    "global_prompt_for",
    "list_examples",
]

# FLUX packs 2x2 latent pixels into a token and the VAE downsamples 8x: one token is 16x16 pixels.
SIZE_MULTIPLE = 16

_LAYOUT_KEYS = ("prompt", "width", "height", "instances")
_LAYOUT_REQUIRED = ("prompt", "width", "height")
_INSTANCE_KEYS = ("prompt", "box", "mask")
_INSTANCE_REQUIRED = ("prompt", "box")
# A layout nests 4 deep (layout > instances > instance > box); anything far deeper is not a layout.
_MAX_NESTING = 8
# Integers in a layout are pixel sizes: 20 digits is far past any limit and far below Python's own cap.
_MAX_INT_DIGITS = 20


@dataclass(frozen=True)
class LayoutLimits:
    """How large a layout may be, so a hostile or mistyped file fails in `validate`, not in a render.

    Defaults suit a desktop GPU; a service can pass its own to Layout.load / from_json /
    from_dict. Every value is checked before the work it bounds (the file size before
    the file is read, the pixel count before anything is allocated).
    """

    max_file_bytes: int = 1_000_000  # a 63-instance layout with long prompts is ~150 kB
    max_side: int = 8192  # pixels per side
    max_pixels: int = 4096 * 4096  # width * height: 65536 image tokens
    max_instances: int = MAX_INSTANCES
    max_prompt_chars: int = 2000  # T5 keeps 200 tokens (~800 characters) per prompt by default
    max_path_chars: int = 4096  # a mask path (Linux PATH_MAX)

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_side", "max_pixels", "max_instances", "max_prompt_chars",
                     "max_path_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LayoutLimits.{name} must be a positive integer, got {value!r}")
        if self.max_instances > MAX_INSTANCES:
            raise ValueError(f"LayoutLimits.max_instances = {self.max_instances}: the attention rule supports "
                             f"at most {MAX_INSTANCES} instances")
        if self.max_side < SIZE_MULTIPLE or self.max_pixels < SIZE_MULTIPLE * SIZE_MULTIPLE:
            raise ValueError(f"LayoutLimits must allow at least one {SIZE_MULTIPLE}x{SIZE_MULTIPLE} token")


DEFAULT_LAYOUT_LIMITS = LayoutLimits()
_NO_LENGTH_LIMITS = LayoutLimits(max_prompt_chars=sys.maxsize, max_path_chars=sys.maxsize)


class LayoutError(UserError, ValueError):
    """A layout problem; `field` is the JSON path of the offending value ('' for the whole file).

    A file with several problems raises one LayoutError for the first, whose
    one-line message says how many more there are; `problems` holds every one
    (each a LayoutError with its own field), so `threedis validate` can list them all.
    """

    def __init__(self, message: str, field: str = "", problems: Iterable["LayoutError"] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.problems: tuple[LayoutError, ...] = tuple(problems) or (self,)

    @classmethod
    def combine(cls, problems: list["LayoutError"]) -> "LayoutError":
        """One error for several problems: the first one's message and field, plus a count."""
        if len(problems) == 1:
            return problems[0]
        more = len(problems) - 1
        note = f" (and {more} more problem{'s' if more > 1 else ''}; `threedis validate` lists them all)"
        return cls(f"{problems[0]}{note}", problems[0].field, problems)


class EmptyPromptError(LayoutError):
    """A prompt that is empty: what a caller that reads no prompt (a photo's depth, a plan) may let pass."""


def _fail(field: str, message: str) -> LayoutError:
    return LayoutError(f"{field}: {message}" if field else message, field)


class _Problems:
    """Collects every problem of one layout instead of stopping at the first."""

    def __init__(self) -> None:
        self.found: list[LayoutError] = []

    def check(self, check: Callable[..., Any], *args: Any) -> Any:
        """check(*args), or None after recording the LayoutError(s) it raised."""
        try:
            return check(*args)
        except LayoutError as err:
            self.found.extend(err.problems)
            return None

    def raise_any(self) -> None:
        if self.found:
            raise LayoutError.combine(self.found)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 2, 60, 60
_SHORT_REPR.maxlist = _SHORT_REPR.maxdict = _SHORT_REPR.maxtuple = 6


def _describe(value: Any) -> str:
    """Short one-line rendering of a bad value for an error message.

    reprlib bounds the work: a plain repr of a huge or deeply nested value would take
    memory or hit the recursion limit before it could be shortened.
    """
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    return {bool: "a boolean", str: "a string", type(None): "null", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _check_text(value: str, field: str, limit: int, what: str) -> None:
    """Length and characters every tokenizer, file system and PNG text chunk can take."""
    if len(value) > limit:
        raise _fail(field, f"is {len(value)} characters long, at most {limit} are allowed; shorten the {what}")
    if "\x00" in value:
        raise _fail(field, f"contains a NUL character (\\u0000) at position {value.index(chr(0))}; remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _fail(
            field,
            f"contains an invalid character {value[exc.start]!a} at position {exc.start} (a lone UTF-16 "
            f"surrogate, not a character); remove it or write the intended character itself",
        ) from None


def _check_prompt(value: Any, field: str, limits: LayoutLimits = DEFAULT_LAYOUT_LIMITS) -> str:
    if not isinstance(value, str):
        raise _fail(field, f"must be a text prompt (a string), got {_type_name(value)} {_describe(value)}")
    _check_text(value, field, limits.max_prompt_chars, "prompt")
    if not value.strip():
        raise EmptyPromptError(f"{field}: is empty; write a short description of what should appear", field)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_box(value: Any, field: str) -> tuple[float, float, float, float]:
    shape_hint = "give 4 numbers [x0, y0, x1, y1] in 0..1 (origin top-left, x to the right)"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _fail(field, f"must be a list of 4 numbers, got {_type_name(value)} {_describe(value)}; {shape_hint}")
    if len(value) != 4:
        raise _fail(field, f"has {len(value)} values {_describe(list(value))}; {shape_hint}")
    names = ("x0", "y0", "x1", "y1")
    for name, v in zip(names, value):
        if not _is_number(v):
            raise _fail(field, f"{name} is {_type_name(v)} {_describe(v)}, not a number; {shape_hint}")
        if not math.isfinite(v):
            raise _fail(field, f"{name} is {v!r}; {shape_hint}")
    x0, y0, x1, y1 = (float(v) for v in value)
    for name, v in zip(names, (x0, y0, x1, y1)):
        if not 0.0 <= v <= 1.0:
            raise _fail(
                field,
                f"{name} = {v:g} is outside [0, 1]; box coordinates are fractions of the image size "
                f"(divide pixel coordinates by the width/height)",
            )
    if x0 >= x1:
        raise _fail(field, f"x0 = {x0:g} must be smaller than x1 = {x1:g} (the box needs a positive width)")
    if y0 >= y1:
        raise _fail(field, f"y0 = {y0:g} must be smaller than y1 = {y1:g} (the box needs a positive height)")
    return (x0, y0, x1, y1)


def _check_size(value: Any, field: str, limits: LayoutLimits = DEFAULT_LAYOUT_LIMITS) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(field, f"must be a whole number of pixels, got {_type_name(value)} {_describe(value)}")
    if value > limits.max_side:
        raise _fail(field, f"{_describe(value)} pixels is more than the limit of {limits.max_side}; "
                           f"render at most {limits.max_side} pixels per side")
    if value <= 0 or value % SIZE_MULTIPLE:
        low = (value // SIZE_MULTIPLE) * SIZE_MULTIPLE
        options = [v for v in (low, low + SIZE_MULTIPLE) if v > 0] or [SIZE_MULTIPLE]
        suggestion = " or ".join(str(v) for v in options)
        raise _fail(
            field,
            f"must be a positive multiple of {SIZE_MULTIPLE} (one FLUX token is {SIZE_MULTIPLE}x{SIZE_MULTIPLE} "
            f"pixels), got {value}; nearest valid: {suggestion}",
        )
    return value


def check_pixels(width: int, height: int, limits: LayoutLimits = DEFAULT_LAYOUT_LIMITS) -> None:
    """Refuse a size over the pixel limit (a LayoutError on the field `width`)."""
    if width * height > limits.max_pixels:
        raise _fail("width", f"{width}x{height} is {width * height} pixels, more than the limit of "
                             f"{limits.max_pixels} ({_megapixels(limits.max_pixels)}); choose a smaller size")


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def _check_mask(value: Any, field: str, limits: LayoutLimits = DEFAULT_LAYOUT_LIMITS) -> str | None:
    """The mask must exist and decode as an image now, not 10 minutes into a render."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise _fail(field, f"must be a path to a mask image (a string) or null, got {_type_name(value)} {_describe(value)}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise _fail(field, f"must be a path written as text, got {_type_name(text)} {_describe(text)}")
    _check_text(text, field, limits.max_path_chars, "mask path")
    if not text.strip():
        raise _fail(field, "is an empty path; give a mask image path or remove the key")
    path = Path(text)
    problem = file_problem(path)
    if problem is not None:
        where = f" (resolved to {path.resolve()})" if not path.is_absolute() else ""
        raise _fail(
            field,
            f"mask file {text}{where}: {problem}; relative paths are resolved against the layout file's "
            f"folder (the current folder for layouts not loaded from a file)",
        )
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # PIL raises many types for broken files
        raise _fail(field, f"cannot read mask image {text}: {type(exc).__name__}: {exc}; give a PNG/JPEG image") from None
    return text


def _check_keys(data: Mapping[str, Any], field: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    """Every unknown and every missing key, one problem each."""
    what = field or "layout"
    problems = [
        _fail(f"{field}.{_key_name(key)}" if field else _key_name(key),
              f"unknown key in {what}; allowed keys are: {', '.join(allowed)}")
        for key in data
        if key not in allowed
    ]
    problems += [
        _fail(f"{field}.{key}" if field else key, f"missing; {what} needs the keys: {', '.join(required)}")
        for key in required
        if key not in data
    ]
    if problems:
        raise LayoutError.combine(problems)


def _key_name(key: Any) -> str:
    """A key as it appears in an error path: itself when short and printable, else its short repr."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 40 else _describe(key)


def check_nesting(data: Any, limit: int = _MAX_NESTING) -> None:
    """Refuse values nested deeper than `limit` (a layout's by default), iteratively: no recursion for a nesting bomb."""
    level = [data]
    for depth in range(limit + 1):
        level = [child for item in level if isinstance(item, (Mapping, list, tuple))
                 for child in (item.values() if isinstance(item, Mapping) else item)]
        if not level:
            return
    raise LayoutError(f"the layout is nested more than {limit} levels deep; a layout is an object holding a "
                      f"list of instance objects, each with a list of 4 numbers")


def _check_object(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        what = field or "the layout"
        raise _fail(field, f"{what} must be a JSON object {{...}}, got {_type_name(value)} {_describe(value)}")
    return value


@dataclass(frozen=True)
class Instance:
    """One instance: its description and where it goes.

    box: (x0, y0, x1, y1) as fractions of the image, origin top-left.
    mask: optional image path used instead of the box for the attention region
    (nonzero = inside), as in SPEC section 3.
    """

    prompt: str
    box: tuple[float, float, float, float]
    mask: str | None = None

    def __post_init__(self) -> None:
        self._validate("instance")

    def _validate(self, field: str) -> None:
        # Lengths are the layout's limits to check (a service may allow more); characters are checked here.
        _check_prompt(self.prompt, f"{field}.prompt", _NO_LENGTH_LIMITS)
        object.__setattr__(self, "box", _check_box(self.box, f"{field}.box"))
        object.__setattr__(self, "mask", _check_mask(self.mask, f"{field}.mask", _NO_LENGTH_LIMITS))

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | os.PathLike | None = None, field: str = "instance",
                  limits: LayoutLimits | None = None) -> "Instance":
        """Build from {"prompt", "box", "mask"?}; a relative mask path is resolved against base_dir."""
        limits = limits or DEFAULT_LAYOUT_LIMITS
        data = _check_object(data, field)
        problems = _Problems()
        problems.check(_check_keys, data, field, _INSTANCE_KEYS, _INSTANCE_REQUIRED)
        prompt = box = None
        if "prompt" in data:
            prompt = problems.check(_check_prompt, data["prompt"], f"{field}.prompt", limits)
        if "box" in data:
            box = problems.check(_check_box, data["box"], f"{field}.box")
        mask = data.get("mask")
        if (isinstance(mask, str) and mask.strip() and len(mask) <= limits.max_path_chars and base_dir is not None
                and not Path(mask).is_absolute()):
            mask = str(Path(base_dir) / mask)
        mask = problems.check(_check_mask, mask, f"{field}.mask", limits)
        problems.raise_any()
        return cls(prompt=prompt, box=box, mask=mask)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "box": list(self.box)}
        if self.mask is not None:
            out["mask"] = self.mask
        return out


@dataclass(frozen=True)
class Layout:
    """Global prompt, output size in pixels and the instances; valid by construction.

    limits: what it was checked against (DEFAULT_LAYOUT_LIMITS unless a service chose others);
    kept so that `dataclasses.replace` checks a changed copy against the same limits.
    """

    prompt: str
    width: int
    height: int
    instances: tuple[Instance, ...] = ()
    limits: LayoutLimits = field(default=DEFAULT_LAYOUT_LIMITS, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.limits, LayoutLimits):
            raise TypeError(f"limits must be a LayoutLimits, got {type(self.limits).__name__}")
        _check_prompt(self.prompt, "prompt", self.limits)
        _check_size(self.width, "width", self.limits)
        _check_size(self.height, "height", self.limits)
        check_pixels(self.width, self.height, self.limits)
        items = self.instances
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
            raise _fail("instances", f"must be a list of instances, got {_type_name(items)} {_describe(items)}")
        items = tuple(items)
        _check_count(len(items), self.limits)
        for i, item in enumerate(items):
            if not isinstance(item, Instance):
                raise _fail(f"instances[{i}]", f"must be an Instance, got {_type_name(item)} {_describe(item)}")
            _check_text(item.prompt, f"instances[{i}].prompt", self.limits.max_prompt_chars, "prompt")
            if item.mask is not None:
                _check_text(item.mask, f"instances[{i}].mask", self.limits.max_path_chars, "mask path")
        object.__setattr__(self, "instances", items)

    # -- construction from data -------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | os.PathLike | None = None,
                  limits: LayoutLimits | None = None) -> "Layout":
        """Validate a layout object from anywhere (a JSON file, PNG metadata, an HTTP body).

        The strict entry point: unknown keys, wrong types and values over `limits`
        (default DEFAULT_LAYOUT_LIMITS) are errors. Relative mask paths are resolved
        against base_dir. Every problem is found, not just the first: the LayoutError
        raised names the first and lists all of them in `problems`.
        """
        limits = limits or DEFAULT_LAYOUT_LIMITS
        check_nesting(data)
        data = _check_object(data, "")
        problems = _Problems()
        problems.check(_check_keys, data, "", _LAYOUT_KEYS, _LAYOUT_REQUIRED)
        values = {}
        for key, check in (("prompt", _check_prompt), ("width", _check_size), ("height", _check_size)):
            if key in data:
                values[key] = problems.check(check, data[key], key, limits)
        if values.get("width") is not None and values.get("height") is not None:
            problems.check(check_pixels, values["width"], values["height"], limits)
        raw = data.get("instances", [])
        instances: list[Instance | None] = []
        if not isinstance(raw, list):
            problems.found.append(
                _fail("instances", f"must be a list [...] of instances, got {_type_name(raw)} {_describe(raw)}")
            )
        else:
            problems.check(_check_count, len(raw), limits)
            instances = [  # past the limit only the count is reported: each item may open a mask image
                problems.check(Instance.from_dict, item, base_dir, f"instances[{i}]", limits)
                for i, item in enumerate(raw[: limits.max_instances])
            ]
        problems.raise_any()
        return cls(instances=tuple(instances), limits=limits, **values)

    @classmethod
    def from_json(cls, text: str, base_dir: str | os.PathLike | None = None, source: str = "layout JSON",
                  limits: LayoutLimits | None = None) -> "Layout":
        """Parse JSON text strictly (no NaN/Infinity, no duplicate keys, bounded numbers), then from_dict."""
        limits = limits or DEFAULT_LAYOUT_LIMITS
        if len(text) > limits.max_file_bytes:
            raise LayoutError(f"{source}: {len(text)} characters, more than the limit of {limits.max_file_bytes} "
                              f"for a layout; is this the right file?")
        try:
            data = loads_strict(text)
        except json.JSONDecodeError as exc:
            raise LayoutError(
                f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        except LayoutError as err:
            raise LayoutError(f"{source}: {err}") from None
        except RecursionError:
            raise LayoutError(f"{source}: the JSON is nested too deeply to be a layout") from None
        return cls.from_dict(data, base_dir=base_dir, limits=limits)

    @classmethod
    def load(cls, path: str | os.PathLike, limits: LayoutLimits | None = None) -> "Layout":
        """Read a layout file; mask paths inside it are relative to the file's folder.

        The size is checked before reading, and at most max_file_bytes + 1 bytes are
        read (a file may grow, or be a pipe), so a huge file costs nothing.
        """
        limits = limits or DEFAULT_LAYOUT_LIMITS
        path = Path(path)
        problem = file_problem(path)
        if problem is not None:
            raise LayoutError(f"layout file {path}: {problem}; give the path to a .json layout")
        too_big = f"{path}: the file is larger than the limit of {limits.max_file_bytes} bytes for a layout; " \
                  f"is this the right file?"
        try:
            if path.stat().st_size > limits.max_file_bytes:
                raise LayoutError(too_big)
            with path.open("rb") as handle:
                raw = handle.read(limits.max_file_bytes + 1)
            if len(raw) > limits.max_file_bytes:
                raise LayoutError(too_big)
            text = raw.decode("utf-8-sig")  # a byte-order mark (some Windows editors) is not an error
        except (OSError, UnicodeDecodeError) as exc:
            raise LayoutError(f"cannot read layout file {path}: {exc}") from None
        return cls.from_json(text, base_dir=path.parent.resolve(), source=str(path), limits=limits)

    # -- output -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "width": self.width,
            "height": self.height,
            "instances": [inst.to_dict() for inst in self.instances],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write JSON; masks inside the target folder are written relative so the pair can be moved."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise LayoutError(f"{path} already exists; choose another name or pass overwrite=True")
        folder = path.parent.resolve()
        data = self.to_dict()
        for inst, item in zip(self.instances, data["instances"]):
            if inst.mask is not None:
                mask = Path(inst.mask).resolve()
                item["mask"] = mask.relative_to(folder).as_posix() if mask.is_relative_to(folder) else str(mask)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    # -- views used by the engine ---------------------------------------------

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [inst.box for inst in self.instances]

    @property
    def grid(self) -> tuple[int, int]:
        """Latent token grid (h, w) = (height/16, width/16)."""
        return self.height // SIZE_MULTIPLE, self.width // SIZE_MULTIPLE

    def load_masks(self) -> list[Any]:
        """Grayscale ('L') PIL image per instance, None where the instance uses its box."""
        from PIL import Image, ImageOps

        out: list[Any] = []
        for i, inst in enumerate(self.instances):
            if inst.mask is None:
                out.append(None)
                continue
            try:
                with Image.open(inst.mask) as image:
                    out.append(ImageOps.exif_transpose(image).convert("L"))
            except Exception as exc:
                raise _fail(f"instances[{i}].mask", f"cannot read mask image {inst.mask}: {exc}") from None
        return out

    def prompts(self, append_instances: bool = True) -> list[str]:
        """SPEC section 2's prompt list [global, inst_1, ..., inst_N], each as the user wrote it.

        The global prompt comes from `global_prompt_for`, shared with stage 1.
        """
        parts = [inst.prompt for inst in self.instances]
        return [global_prompt_for(self.prompt, parts, append_instances), *parts]


def global_prompt_for(prompt: str, instance_prompts: Sequence[str], append_instances: bool = True) -> str:
    """The global prompt of both stages, as the authors build it: the user's global prompt with
    "," + each instance description appended raw (no space added, nothing stripped), so the
    global chunk and the pooled CLIP vector mention every object (docs/fidelity.md)."""
    return prompt + "".join("," + p for p in instance_prompts) if append_instances else prompt


def _check_count(n: int, limits: LayoutLimits = DEFAULT_LAYOUT_LIMITS) -> None:
    if n > limits.max_instances:
        why = (" (each token's instance membership is a 64-bit integer bitmask with the sign bit kept clear)"
               if limits.max_instances == MAX_INSTANCES else " (this service's limit)")
        raise _fail(
            "instances",
            f"{n} instances given, at most {limits.max_instances} are supported{why}; "
            f"merge or drop {n - limits.max_instances}",
        )


# -- strict JSON ------------------------------------------------------------------


def loads_strict(text: str | bytes) -> Any:
    """json.loads for text from users (layouts, job lines, request bodies): NaN/Infinity, a key given
    twice and numbers over 20 digits are LayoutErrors; bad JSON and nesting bombs raise as json does
    (JSONDecodeError, RecursionError), so each caller words those for its input."""
    return json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant, object_pairs_hook=_unique_keys)


def _bounded_int(text: str) -> int:
    """json's parse_int: a 5000-digit number is refused here, before int() spends time on it."""
    digits = len(text.lstrip("-"))
    if digits > _MAX_INT_DIGITS:
        raise LayoutError(f"a number with {digits} digits is not a plausible value "
                          f"(at most {_MAX_INT_DIGITS} digits)")
    return int(text)


def _no_constant(name: str) -> float:
    raise LayoutError(f"{name} is not a JSON number; give a finite number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a key given twice is a mistake (json would silently keep the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise LayoutError(f"key {_key_name(key)!r} appears twice in one object; keep one")
        out[key] = value
    return out


# -- bundled examples -----------------------------------------------------------


def list_examples() -> list[str]:
    """Names of the example layouts shipped in threedis.examples (without .json)."""
    root = resources.files("threedis.examples")
    return sorted(entry.name[: -len(".json")] for entry in root.iterdir() if entry.name.endswith(".json"))


def example_path(name: str) -> Path:
    """Path of a bundled example layout, by name with or without the .json suffix."""
    stem = name[: -len(".json")] if name.endswith(".json") else name
    entry = resources.files("threedis.examples") / f"{stem}.json"
    if not entry.is_file():
        raise LayoutError(f"no example layout named {name!r}; available: {', '.join(list_examples())}")
    return Path(os.fspath(entry))
