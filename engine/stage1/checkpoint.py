"""Loading the authors' stage-1 weights safely and strictly.

The release ships two pickles: `unet_0901.ckpt` (the fine-tuned text-to-depth UNet,
a plain diffusers-key state dict) and `layout_adapter.ckpt` (the adapter, keys
`<layer>.attn2.processor.migc.*`, sometimes wrapped under "state_dict"). Pickles can
run code, so they are only read with `torch.load(weights_only=True)`; a one-time
`convert_to_safetensors` makes a `.safetensors` sibling that is preferred from then
on. Key sets are checked before anything is loaded so a wrong file fails with the
names that are off, not with a deep torch trace.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from threedis.engine.errors import UserError
from threedis.engine.model_paths import is_hub_id
from threedis.engine.paths import input_file

__all__ = [
    "ADAPTER_FILENAME",
    "UNET_FILENAME",
    "WEIGHTS_REPO_ID",
    "check_state_keys",
    "convert_release_files",
    "convert_to_safetensors",
    "is_hub_id",
    "load_adapter_weights",
    "load_state_file",
    "load_unet_weights",
    "read_pickle_state",
    "resolve_weight_file",
]

WEIGHTS_REPO_ID = "sanaka87/3DIS"  # the authors' Hugging Face page (README of limuloo/3DIS)
UNET_FILENAME = "unet_0901.ckpt"
ADAPTER_FILENAME = "layout_adapter.ckpt"
_SHOW = 5  # how many offending keys an error names


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path} is not a plain state dict: {len(bad)} entries are not named tensors "
                        f"(first: {', '.join(map(repr, bad[:_SHOW]))})")
    return dict(obj)


def _torch_file_kind(path: Path) -> str | None:
    """"zip" (torch.save since 1.6), "pickle" (older torch.save) or None (neither: a text file, an image...)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except PermissionError:
        raise UserError(f"{path}: permission denied; give this user read access (e.g. chmod a+r {path})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if head == b"PK\x03\x04":
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle, protocol 2..5
        return "pickle"
    return None


def read_pickle_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, read with weights_only=True (memory-mapped when the format allows)."""
    path = input_file(path, "weights file")
    if _torch_file_kind(path) is None:
        raise UserError(f"{path} is not a torch checkpoint (neither a zip nor a pickle file); give the .ckpt file "
                        f"as downloaded from https://huggingface.co/{WEIGHTS_REPO_ID}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"refusing to load {path}: it holds Python objects other than tensors, and only "
                        f"weights_only loading is allowed ({first[:200]}); use the authors' original file "
                        f"or a .safetensors copy") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways inside torch.load
        raise UserError(f"cannot read {path} as a torch checkpoint: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}; the file is damaged or not a checkpoint") \
            from None
    return _unwrap(obj, path)


def load_state_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """State dict from a .safetensors file, or a pickle (preferring its .safetensors sibling)."""
    from safetensors.torch import load_file

    path = Path(path)
    sibling = path.with_suffix(".safetensors")
    if path.suffix != ".safetensors" and sibling.is_file():
        path = sibling
    if path.suffix == ".safetensors":
        input_file(path, "weights file")
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise UserError(f"cannot read {path} as safetensors: {exc}") from None
    return read_pickle_state(path)


def convert_to_safetensors(ckpt_path: str | os.PathLike[str],
                           out_path: str | os.PathLike[str] | None = None) -> Path:
    """Write the tensors of a .ckpt pickle to safetensors (default: the .safetensors sibling).

    Tensors sharing storage are copied apart, since safetensors stores each on its own.
    """
    from safetensors.torch import save_file

    ckpt_path = Path(ckpt_path)
    out = Path(out_path) if out_path is not None else ckpt_path.with_suffix(".safetensors")
    state = read_pickle_state(ckpt_path)
    seen: set[tuple[int, int]] = set()
    flat: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        v = v.detach().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        flat[k] = v.clone() if key in seen or v.untyped_storage().nbytes() != v.nbytes else v
        seen.add(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(flat, tmp, metadata={"format": "pt", "converted_from": ckpt_path.name})
    os.replace(tmp, out)
    return out


def convert_release_files(path: str | os.PathLike[str], overwrite: bool = False) -> list[tuple[Path, bool]]:
    """One-time conversion of the release pickles: a .ckpt file, or a folder holding
    unet_0901.ckpt and/or layout_adapter.ckpt -> a .safetensors copy beside each.

    Returns (safetensors path, written) per file; an existing copy is kept unless `overwrite`.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        files = [path / n for n in (UNET_FILENAME, ADAPTER_FILENAME) if (path / n).is_file()]
        if not files:
            raise UserError(f"{path} holds neither {UNET_FILENAME} nor {ADAPTER_FILENAME}; give the folder you "
                            f"downloaded them into (https://huggingface.co/{WEIGHTS_REPO_ID}) or a .ckpt file")
    elif path.suffix == ".safetensors":
        raise UserError(f"{path} is already safetensors; give the .ckpt file to convert")
    else:
        files = [input_file(path, "weights file")]
    done = []
    for file in files:
        out = file.with_suffix(".safetensors")
        if out.exists() and not overwrite:
            done.append((out, False))
            continue
        done.append((convert_to_safetensors(file, out), True))
    return done


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOW]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else f" ({len(keys)})")


def check_state_keys(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise one UserError naming missing, unexpected and wrongly shaped keys (first few + count)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(found[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        shown = [f"{k} {tuple(found[k].shape)} != {tuple(expected[k])}" for k in shapes]
        parts.append(f"wrong shapes: {_listing(shown)}")
    raise UserError(f"{what} does not match the model: " + "; ".join(parts)
                    + ". Check that the file is the right one for this model.")


def load_unet_weights(unet: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      dtype: torch.dtype | None = None) -> None:
    """Replace all UNet weights (before stage-1 processors are installed), cast to `dtype`.

    Assigns tensors, so a UNet built on the meta device takes the checkpoint's
    (memory-mapped) storage, copied only where the dtype changes.
    """
    expected = {k: v.shape for k, v in unet.state_dict().items()}
    check_state_keys(expected, state, f"UNet weights {source}")
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    unet.load_state_dict(cast, strict=True, assign=True)
    left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"UNet weights {source} left tensors unset: {_listing(left)}")


def load_adapter_weights(processors: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `<layer>.attn2.processor.<sub key>` tensors into the installed adapter processors."""
    expected = {f"{layer}.attn2.processor.{k}": v.shape
                for layer, proc in processors.items() for k, v in proc.state_dict().items()}
    check_state_keys(expected, state, f"layout adapter weights {source}")
    for layer, proc in processors.items():
        prefix = f"{layer}.attn2.processor."
        proc.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)


def resolve_weight_file(spec: str | os.PathLike[str], filename: str, local_files_only: bool = False) -> Path:
    """A local weights file from a file path, a folder holding `filename`, or a hub repo id."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / filename, (path / filename).with_suffix(".safetensors")):
            if candidate.is_file():
                return candidate
        raise UserError(f"{path} has no {filename}; download it from https://huggingface.co/{WEIGHTS_REPO_ID} "
                        f"into that folder")
    if not is_hub_id(text) or path.exists():
        input_file(path, "weights file", f"give the path of {filename} (from https://huggingface.co/{WEIGHTS_REPO_ID})")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(text, filename, local_files_only=local_files_only))
    except Exception as exc:  # offline, unknown repo or file: the same advice for the user
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"cannot get {filename} from the hub repo {text!r}: {type(exc).__name__}: {first[:200]}; without "
            f"internet, download {filename} from https://huggingface.co/{text} on a connected machine, put it "
            f"next to the base model folder (or anywhere) and pass its path") from None
