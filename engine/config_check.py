"""Model config files checked against the shipped real configs, before any model is built.

Why: diffusers and transformers build whatever a config.json says. A string where a
size belongs fails deep inside a constructor, an empty list of channels with an
IndexError, `num_layers: 1000000000` allocates until the machine gives up, and a
text-encoder folder holding the other encoder loads but computes nonsense. Each
value is checked here against the same key of the published model's config
(engine/configs/): same kind of value, positive where the real one is, and a size
at most SIZE_FACTOR times the real one. The message names the component and file.
"""

from __future__ import annotations

import importlib.resources
import json
import math
from pathlib import Path
from typing import Any, Mapping

from threedis.engine.errors import UserError

__all__ = ["SIZE_FACTOR", "check_config", "read_json", "reference_config"]

SIZE_FACTOR = 16  # a size above this multiple of the real model's is refused as a broken file

# model_type values a transformers config may carry for each expected class.
_MODEL_TYPES = {
    "CLIPTextModel": ("clip_text_model",),
    "T5EncoderModel": ("t5",),
    "Sam2Model": ("sam2", "sam2_video"),
    "DepthAnythingForDepthEstimation": ("depth_anything",),
    "GroundingDinoForObjectDetection": ("grounding-dino",),
    "SamModel": ("sam",),
}

# Schedulers have no bundled config file: the published values the engine relies on.
_SCHEDULERS: dict[str, dict[str, Any]] = {
    "flux_scheduler": {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    "ldm3d_4c_scheduler": {  # stage 1 reads the betas into UniPC, whatever class the file names
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    },
}


def read_json(name: str, file: Path) -> dict[str, Any]:
    """A JSON object from `file`, or one UserError saying what is wrong with it and what to do."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{name}: {file}: file not found; the model folder is incomplete") from None
    except PermissionError:
        raise UserError(f"{name}: {file}: permission denied; give this user read access "
                        f"(e.g. chmod a+r {file})") from None
    except IsADirectoryError:
        raise UserError(f"{name}: {file}: is a folder, not a file") from None
    except UnicodeDecodeError:
        raise UserError(f"{name}: {file}: not a text file (not UTF-8); restore the original file") from None
    except OSError as exc:
        raise UserError(f"{name}: {file}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{name}: {file}: not valid JSON ({str(exc)[:120]}); restore the original file") from None
    if not isinstance(data, dict):
        raise UserError(f"{name}: {file}: holds a JSON {type(data).__name__}, not an object of settings")
    return data


def reference_config(ref: str) -> dict[str, Any]:
    """A bundled real config by name (engine/configs/<ref>.json) or a built-in scheduler reference."""
    if ref in _SCHEDULERS:
        return _SCHEDULERS[ref]
    resource = importlib.resources.files("threedis.engine").joinpath("configs", f"{ref}.json")
    return json.loads(resource.read_text(encoding="utf-8"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value_problem(key: str, value: Any, ref: Any) -> str | None:
    """Why `value` cannot stand where the real config has `ref` (None if it can)."""
    if ref is None or key.startswith("_"):
        return None
    if isinstance(ref, bool):
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if _is_int(ref):
        if key.endswith("_id"):  # token ids: any index
            return None if _is_int(value) and value >= 0 else f"must be a whole number >= 0, got {value!r}"
        if ref <= 0:
            return None if _is_int(value) else f"must be a whole number, got {value!r}"
        limit = SIZE_FACTOR * ref
        if not _is_int(value) or value <= 0:
            return f"must be a positive integer, got {value!r}"
        if value > limit:
            return f"must be at most {limit} ({SIZE_FACTOR}x the real model's {ref}), got {value}"
        return None
    if isinstance(ref, float):
        if not _is_number(value) or not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if ref > 0 and value <= 0:
            return f"must be positive, got {value!r}"
        return None
    if isinstance(ref, str):
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if isinstance(ref, list):
        if not isinstance(value, list):
            return f"must be a list, got {value!r}"
        if ref and not value:
            return "must not be empty"
        if ref:
            item_ref = max(ref) if all(_is_int(r) for r in ref) else ref[0]
            for item in value:
                problem = _value_problem(key, item, item_ref)
                if problem is not None:
                    return f"entries {problem}"
        return None
    if isinstance(ref, dict):
        return None if isinstance(value, dict) else f"must be an object of settings, got {value!r}"
    return None


def _identity_problem(config: Mapping[str, Any], ref: Mapping[str, Any]) -> str | None:
    """A config of another kind of model (e.g. the two text encoders' folders exchanged)."""
    expected = ref.get("_class_name")
    if expected is None:
        return None
    if ref.get("_library") == "transformers":
        kind = config.get("model_type")
        allowed = _MODEL_TYPES.get(expected, ())
        if kind is not None and allowed and kind not in allowed:
            return f"holds a {kind!r} model, expected {expected} (model_type {allowed[0]!r})"
        return None
    found = config.get("_class_name")
    if found is not None and found != expected:
        return f"holds a {found}, expected a {expected}"
    return None


def _walk(name: str, file: Path, config: Mapping[str, Any], ref: Mapping[str, Any], prefix: str = "") -> None:
    for key, ref_value in ref.items():
        if key.startswith("_") or key not in config:
            continue
        value = config[key]
        if isinstance(ref_value, dict) and isinstance(value, dict):
            _walk(name, file, value, ref_value, f"{prefix}{key}.")
            continue
        problem = _value_problem(key, value, ref_value)
        if problem is not None:
            raise UserError(f"{name}: {file}: {prefix}{key} {problem}")


def check_config(name: str, file: Path, config: Mapping[str, Any], ref: str) -> None:
    """Raise one UserError for the first value of `config` that the real model's config (`ref`) rules out."""
    reference = reference_config(ref)
    problem = _identity_problem(config, reference)
    if problem is not None:
        raise UserError(f"{name}: {file}: {problem}; is this folder from another model, or are two folders "
                        f"exchanged?")
    _walk(name, file, config, reference)
