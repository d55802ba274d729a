"""Load FLUX.1-Depth-dev parts from a diffusers-format folder or a hub id.

Each model has its own loader (transformer, VAE, CLIP, T5, scheduler) so the
runtime can later quantize, offload or skip one part without touching the
others; the text encoders in particular are loaded only on a prompt-cache miss.
A checkpoint is checked for completeness *before* anything is loaded, so a
half-downloaded folder fails in a second with a list of what is missing rather
than after minutes with a deep library trace. Every config is then checked against
the published model's (engine/config_check.py) and against the other parts (the
transformer's text width is T5's), and every library load runs inside
`loading_component`, so whatever a broken folder does ends in one line naming the
component and the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from threedis.engine.config_check import check_config, read_json
from threedis.engine.errors import UserError
from threedis.engine.model_paths import DEFAULT_MODEL_ID, flux_folder, flux_how_to_get

__all__ = [
    "DEFAULT_MODEL_ID",
    "FluxComponents",
    "TextEncoders",
    "check_checkpoint",
    "default_device",
    "default_dtype",
    "load_clip",
    "load_clip_tokenizer",
    "load_components",
    "load_scheduler",
    "load_t5",
    "load_t5_tokenizer",
    "load_text_encoders",
    "load_transformer",
    "load_vae",
    "checked_from_pretrained",
    "loading_component",
    "model_class",
    "read_component_config",
    "resolve_checkpoint",
    "SUBFOLDERS",
]


# Subfolder -> what must be in it. "weights" entries are safetensors stems: either
# `<stem>.safetensors` or `<stem>.safetensors.index.json` plus every shard it names.
_PARTS: dict[str, dict[str, Any]] = {
    "transformer": {"files": ["config.json"], "weights": "diffusion_pytorch_model"},
    "vae": {"files": ["config.json"], "weights": "diffusion_pytorch_model"},
    "text_encoder": {"files": ["config.json"], "weights": "model"},
    "text_encoder_2": {"files": ["config.json"], "weights": "model"},
    "tokenizer": {"any_of": [["tokenizer.json"], ["vocab.json", "merges.txt"]]},
    "tokenizer_2": {"any_of": [["tokenizer.json"], ["spiece.model"]]},
    "scheduler": {"files": ["scheduler_config.json"]},
}
# Subfolder -> (its config file, the bundled real config it is checked against).
_CONFIGS = {
    "transformer": ("config.json", "flux_depth_transformer"),
    "vae": ("config.json", "flux_vae"),
    "text_encoder": ("config.json", "clip_l_text"),
    "text_encoder_2": ("config.json", "t5_xxl_encoder"),
    "scheduler": ("scheduler_config.json", "flux_scheduler"),
}
# Library class -> the bundled real config its config.json is checked against (quantized-weight cache).
CLASS_CONFIGS = {"FluxTransformer2DModel": "flux_depth_transformer", "AutoencoderKL": "flux_vae",
                 "CLIPTextModel": "clip_l_text", "T5EncoderModel": "t5_xxl_encoder"}
# Runtime model key -> checkpoint subfolder (the quantized-weight cache and the planner read them).
SUBFOLDERS = {"transformer": "transformer", "vae": "vae", "clip": "text_encoder", "t5": "text_encoder_2"}
CLIP_PARTS = ("text_encoder", "tokenizer")
T5_PARTS = ("text_encoder_2", "tokenizer_2")
ALL_PARTS = tuple(_PARTS)


@dataclass
class TextEncoders:
    """CLIP (pooled vector) and T5 (token embeddings) with their tokenizers; either pair may be None."""

    clip: Any = None
    clip_tokenizer: Any = None
    t5: Any = None
    t5_tokenizer: Any = None


@dataclass
class FluxComponents:
    """The loaded parts of a FLUX depth checkpoint.

    `source` is the local folder they came from (None for models built in memory);
    the engine uses it to load the text encoders lazily and to key the prompt cache.
    """

    transformer: Any
    vae: Any
    scheduler: Any
    text: TextEncoders | None = None
    source: Path | None = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where FLUX is meant to run (CUDA), fp32 on CPU where bf16 matmuls are slow and inexact."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# ------------------------------------------------------------------ one line per broken part


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def loading_component(name: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """Run one part's file reads and library loads; any failure becomes one UserError naming `name` and the file.

    Why one place: a broken folder can fail in hundreds of ways inside diffusers and
    transformers (KeyError, TypeError, OSError, a safetensors error); the user needs
    only the part, the file and what to do. UserErrors pass through unchanged.
    """
    try:
        yield
    except UserError:
        raise
    except PermissionError as exc:
        where = exc.filename or path
        raise UserError(f"{name}: {where}: permission denied; give this user read access "
                        f"(e.g. chmod -R a+rX {path})") from exc
    except MemoryError as exc:
        raise UserError(f"{name}: {path}: ran out of memory while loading it; free memory or use a "
                        f"profile that loads it in a smaller format") from exc
    except Exception as exc:  # noqa: BLE001 - whatever the library raised, the user gets one line
        where = getattr(exc, "filename", None) or path
        raise UserError(f"{name}: {where}: cannot be loaded ({type(exc).__name__}: {_first_line(exc)}); "
                        f"the folder does not hold a working {name}: restore it from the original download") \
            from exc


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def checked_from_pretrained(name: str, folder: Path, cls: Any, *args: Any, **kwargs: Any) -> Any:
    """cls.from_pretrained(...), refusing weights that leave tensors missing or mismatched.

    Why: both libraries only log such a mismatch and fill the gaps with random
    values, so another model's weights file would render noise with exit code 0.
    """
    with loading_component(name, folder):
        model, info = cls.from_pretrained(*args, output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys") or [])
    mismatched = [str(item[0]) if isinstance(item, (tuple, list)) else str(item)
                  for item in info.get("mismatched_keys") or []]
    if missing or mismatched:
        what = "; ".join(part for part in (missing and f"{len(missing)} tensors missing ({_listing(missing)})",
                                           mismatched and f"{len(mismatched)} of another shape "
                                                          f"({_listing(mismatched)})") if part)
        raise UserError(f"{name}: {folder}: the weights do not fit its config.json: {what}; the weights file "
                        f"belongs to another model or the config was edited")
    return model


def read_component_config(name: str, file: Path, ref: str) -> dict[str, Any]:
    """A part's config file, read and checked against the bundled real config `ref` (one UserError if not)."""
    config = read_json(name, file)
    check_config(name, file, config, ref)
    return config


def _cross_check(root: Path, configs: dict[str, dict[str, Any]]) -> None:
    """The parts must fit each other: text widths, latent channels, rope axes."""
    def need(part: str, key: str, default: Any = None) -> Any:
        return configs[part].get(key, default)

    def fail(part: str, message: str) -> None:
        raise UserError(f"{part}: {root / part / _CONFIGS[part][0]}: {message}; are parts of two models mixed "
                        f"in one folder?")

    if "transformer" in configs:
        head, axes = need("transformer", "attention_head_dim", 128), need("transformer", "axes_dims_rope", [16, 56, 56])
        if sum(axes) != head:
            fail("transformer", f"axes_dims_rope {axes} must add up to attention_head_dim {head}")
    pairs = [("text_encoder_2", "d_model", 4096, "joint_attention_dim", 4096, 1),
             ("text_encoder", "hidden_size", 768, "pooled_projection_dim", 768, 1),
             ("vae", "latent_channels", 16, "in_channels", 64, 8)]
    for part, key, default, tkey, tdefault, factor in pairs:
        if "transformer" in configs and part in configs:
            theirs, ours = need(part, key, default), need("transformer", tkey, tdefault)
            if tkey == "in_channels" and ours == 4 * theirs:
                raise UserError(f"transformer: {root / 'transformer' / 'config.json'}: in_channels is {ours}, a FLUX "
                                f"model without depth control; give FLUX.1-Depth-dev ({DEFAULT_MODEL_ID})")
            if ours != factor * theirs:
                times = f"{factor} x " if factor != 1 else ""
                fail("transformer", f"{tkey} is {ours} but must be {times}{part}'s {key} ({theirs})")
    if "transformer" in configs and "vae" in configs:
        out = need("transformer", "out_channels") or need("transformer", "in_channels", 64)
        if out != 4 * need("vae", "latent_channels", 16):
            fail("transformer", f"out_channels is {out} but must be 4 x vae's latent_channels "
                                f"({need('vae', 'latent_channels', 16)})")


def _check_tokenizer_files(part: str, folder: Path) -> None:
    """Tokenizer JSON files parse (a broken tokenizer otherwise fails at the first prompt-cache miss)."""
    for file in sorted(folder.glob("*.json")):
        read_json(part, file)


def check_configs(root: Path, parts: Iterable[str] = ALL_PARTS) -> None:
    """Read and check the config files of `parts`, then, among them, their fit to each other."""
    configs = {}
    for part in parts:
        if part in _CONFIGS:
            name, ref = _CONFIGS[part]
            configs[part] = read_component_config(part, root / part / name, ref)
        elif part.startswith("tokenizer"):
            _check_tokenizer_files(part, root / part)
    _cross_check(root, configs)


# ------------------------------------------------------------------ finding the files


def resolve_checkpoint(path_or_id: str | os.PathLike, local_files_only: bool = False) -> Path:
    """Local folder for a checkpoint: the folder itself, or the hub snapshot of an id.

    Only the diffusers subfolders are fetched (the hub repo also holds a 24 GB
    single-file checkpoint we do not need).
    """
    folder = flux_folder(path_or_id)  # a local folder, a UserError, or None for a hub id
    if folder is not None:
        return folder
    text = os.fspath(path_or_id)
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", *(f"{part}/*" for part in ALL_PARTS)]
    try:
        folder = snapshot_download(
            text, allow_patterns=patterns, ignore_patterns=["*.bin", "*.pt", "*.pth", "*.ckpt"],
            local_files_only=local_files_only,
        )
    except Exception as exc:  # offline, gated, unknown repo, bad id: all end the same way for the user
        mode = "in the local hub cache (local_files_only)" if local_files_only else "on the hub"
        raise UserError(
            f"cannot get model {text!r} {mode}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
            f"{flux_how_to_get('DIR', text)}"
        ) from None
    return Path(folder)


def safetensors_header(path: Path, max_header_bytes: int | None = None) -> dict[str, Any]:
    """The JSON header of a .safetensors file, checked to be whole; ValueError says why it is not.

    A half-finished download keeps its header but lacks the tail; the header says how
    many data bytes follow, so truncation shows without reading the weights.
    max_header_bytes: refuse a longer header before reading it (a file from a client).
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:  # PermissionError propagates: it is not a download problem
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"truncated: {size} bytes")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise ValueError(f"truncated: {size} bytes, header alone needs {header_len + 8}")
        if max_header_bytes is not None and header_len > max_header_bytes:
            raise ValueError(f"its header claims {header_len} bytes, more than {max_header_bytes}")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):  # nesting bomb too
        raise ValueError("not a readable safetensors file") from None
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ValueError(f"truncated: {size} of {expected} bytes")
    return header


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be complete (None if it looks whole), reading only its header."""
    try:
        safetensors_header(path)
    except PermissionError:
        raise
    except ValueError as err:
        return str(err)
    except OSError:
        return "not a readable safetensors file"
    return None


def _missing_weights(folder: Path, stem: str) -> list[str]:
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single.name]
    elif not index.is_file():
        return [f"{folder.name}/{single.name}"]
    else:
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except PermissionError:
            raise
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return [f"{folder.name}/{index.name} (unreadable index)"]
    missing = []
    for name in files:
        path = folder / name
        problem = "missing" if not path.is_file() else _safetensors_problem(path)
        if problem == "missing":
            missing.append(f"{folder.name}/{name}")
        elif problem is not None:
            missing.append(f"{folder.name}/{name} ({problem})")
    return missing


def check_checkpoint(root: Path, parts: Iterable[str] = ALL_PARTS) -> None:
    """Raise one UserError listing every missing file of the named subfolders, else for a broken config."""
    parts = list(parts)
    missing: list[str] = []
    for part in parts:
        spec = _PARTS[part]
        folder = root / part
        if not folder.is_dir():
            missing.append(f"{part}/")
            continue
        with loading_component(part, folder):
            missing += [f"{part}/{name}" for name in spec.get("files", []) if not (folder / name).is_file()]
            if "weights" in spec:
                missing += _missing_weights(folder, spec["weights"])
            if "any_of" in spec and not any(all((folder / n).is_file() for n in group) for group in spec["any_of"]):
                missing.append(f"{part}/" + " or ".join("+".join(group) for group in spec["any_of"]))
    if missing:
        broken = [m for m in missing if m.endswith(")")]  # present but truncated or unreadable
        absent = [m for m in missing if m not in broken]
        what = "; ".join(f"{label} {', '.join(items)}" for label, items in (("missing", absent), ("incomplete", broken))
                         if items)
        raise UserError(f"incomplete FLUX depth checkpoint at {root}: {what}; {flux_how_to_get(str(root))}")
    check_configs(root, parts)


# ------------------------------------------------------------------ one loader per model


def _place(model: Any, device: torch.device | str | None) -> Any:
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


def load_transformer(root: Path, dtype: torch.dtype, device: torch.device | str | None = None) -> Any:
    from diffusers import FluxTransformer2DModel

    check_checkpoint(root, ["transformer"])
    model = checked_from_pretrained("transformer", root / "transformer", FluxTransformer2DModel, root,
                                    subfolder="transformer", torch_dtype=dtype, use_safetensors=True,
                                    local_files_only=True)
    return _place(model, device)


def load_vae(root: Path, dtype: torch.dtype, device: torch.device | str | None = None) -> Any:
    from diffusers import AutoencoderKL

    check_checkpoint(root, ["vae"])
    model = checked_from_pretrained("vae", root / "vae", AutoencoderKL, root, subfolder="vae", torch_dtype=dtype,
                                    use_safetensors=True, local_files_only=True)
    return _place(model, device)


def load_scheduler(root: Path) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    check_checkpoint(root, ["scheduler"])
    with loading_component("scheduler", root / "scheduler"):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)


def model_class(key: str) -> type:
    """The library class of a runtime model key ("transformer", "vae", "clip", "t5")."""
    if key == "transformer":
        from diffusers import FluxTransformer2DModel as cls
    elif key == "vae":
        from diffusers import AutoencoderKL as cls
    elif key == "clip":
        from transformers import CLIPTextModel as cls
    elif key == "t5":
        from transformers import T5EncoderModel as cls
    else:
        raise UserError(f"unknown model {key!r}; one of {', '.join(SUBFOLDERS)}")
    return cls


def load_clip_tokenizer(root: Path) -> Any:
    """CLIP's tokenizer alone (small: kept when the encoder itself is freed)."""
    from transformers import CLIPTokenizer

    check_checkpoint(root, ["tokenizer"])
    with loading_component("tokenizer", root / "tokenizer"):
        return CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)


def load_t5_tokenizer(root: Path) -> Any:
    """T5's tokenizer alone (small: kept when the encoder itself is freed)."""
    from transformers import T5TokenizerFast

    check_checkpoint(root, ["tokenizer_2"])
    with loading_component("tokenizer_2", root / "tokenizer_2"):
        return T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_2", local_files_only=True)


def load_clip(root: Path, dtype: torch.dtype, device: torch.device | str | None = None) -> tuple[Any, Any]:
    from transformers import CLIPTextModel

    check_checkpoint(root, CLIP_PARTS)
    tokenizer = load_clip_tokenizer(root)
    model = checked_from_pretrained("text_encoder", root / "text_encoder", CLIPTextModel, root,
                                    subfolder="text_encoder", dtype=dtype, use_safetensors=True, local_files_only=True)
    return _place(model, device), tokenizer


def load_t5(root: Path, dtype: torch.dtype, device: torch.device | str | None = None) -> tuple[Any, Any]:
    from transformers import T5EncoderModel

    check_checkpoint(root, T5_PARTS)
    tokenizer = load_t5_tokenizer(root)
    model = checked_from_pretrained("text_encoder_2", root / "text_encoder_2", T5EncoderModel, root,
                                    subfolder="text_encoder_2", dtype=dtype, use_safetensors=True,
                                    local_files_only=True)
    return _place(model, device), tokenizer


def load_text_encoders(root: Path, dtype: torch.dtype, device: torch.device | str | None = None) -> TextEncoders:
    clip, clip_tokenizer = load_clip(root, dtype, device)
    t5, t5_tokenizer = load_t5(root, dtype, device)
    return TextEncoders(clip=clip, clip_tokenizer=clip_tokenizer, t5=t5, t5_tokenizer=t5_tokenizer)


def load_components(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    local_files_only: bool = False,
    text_encoders: bool = False,
) -> FluxComponents:
    """Transformer, VAE and scheduler now; the text encoders now only if asked (else lazily, by the engine).

    The whole checkpoint, text encoders included, is checked up front so a missing
    T5 is reported before the 24 GB transformer is read.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    root = resolve_checkpoint(path_or_id, local_files_only)
    check_checkpoint(root)
    return FluxComponents(
        transformer=load_transformer(root, dtype, device),
        vae=load_vae(root, dtype, device),
        scheduler=load_scheduler(root),
        text=load_text_encoders(root, dtype, device) if text_encoders else None,
        source=root,
    )
