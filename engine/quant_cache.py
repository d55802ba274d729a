"""Quantized-weight cache: quantize a model once, reload its quantized tensors afterwards.

Why: quantizing FLUX needs the 24 GB bf16 transformer in memory once; a 16 GB
desktop should never have to hold it again. A cache hit builds the model skeleton on
the `meta` device, swaps in the quantized module classes and assigns the cached
tensors (assign=True): host memory peaks at the quantized size.

Entry layout: `<root>/<key>/model.safetensors` + `meta.json` (key, scheme, config,
source identity, library version, quantized module names, and the safetensors file's
size, full sha256 and a quick fingerprint). Entries are written in a temporary folder
and renamed into place, so a crash never leaves a half entry under a valid name.

Verification on read (QuantCache(verify=...)):
    "full"  (default) sha256 of the whole safetensors file, streamed; ~1 s per 1.5 GB
    "quick" size + sha256 of the safetensors header and 16 evenly spaced 1 MiB chunks
            plus the last one (the whole file when under 18 MiB); misses most
            single-byte corruptions of a large file, but not a truncated or rewritten one.
An entry that fails any check (meta.json unreadable or for another key, hash or size
mismatch, unreadable tensors, tensors that do not fit the skeleton) is logged,
deleted and rebuilt, never used. A cache folder that cannot be written (read-only,
full) only costs speed: the freshly quantized model is used as is, with one
ThreedisWarning, and LoadResult.entry is None.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import torch
from torch import nn

from threedis.engine.config_check import read_json
from threedis.engine.errors import ThreedisWarning, UserError
from threedis.engine.loading import CLASS_CONFIGS, loading_component, read_component_config
from threedis.engine.quantize import (
    QuantConfig,
    apply_quantization,
    convert_skeleton,
    load_quantized_state,
    quantized_module_names,
    scheme_library,
)

__all__ = ["CACHE_FORMAT", "LoadResult", "QuantCache", "cache_key", "default_cache_root", "load_quantized",
           "source_identity"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the entry layout or meta.json changes
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
_SMALL_SOURCE = 64 << 20  # source files up to this size are identified by content hash
_CHUNK = 1 << 20
_QUICK_CHUNKS = 16

Verify = Literal["full", "quick"]


class LoadResult(NamedTuple):
    """What load_quantized returns: the model, whether it came from the cache, and the entry folder
    (None for plain bf16/fp16/fp32 weights, which are never cached)."""

    model: nn.Module
    hit: bool
    entry: Path | None


class _BadEntry(Exception):
    """A cache entry that must not be used (the message says why)."""


# ------------------------------------------------------------------ hashing


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * _CHUNK):
            h.update(block)
    return h.hexdigest()


def _quick_fingerprint(path: Path) -> str:
    """sha256 of size + header + sampled chunks: cheap on a multi-GB file, see module doc."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= (_QUICK_CHUNKS + 2) * _CHUNK:
            h.update(f.read())
            return h.hexdigest()
        head = f.read(8)
        (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        h.update(head + f.read(min(header_len, size - 8)))
        stride = size // _QUICK_CHUNKS
        for offset in [*(i * stride for i in range(_QUICK_CHUNKS)), size - _CHUNK]:
            f.seek(offset)
            h.update(f.read(_CHUNK))
    return h.hexdigest()


# ------------------------------------------------------------------ keys


def source_identity(folder: Path) -> list[dict[str, Any]]:
    """What identifies a source checkpoint folder's weights without reading 24 GB.

    Safetensors files (and shard indexes) by name and size, plus a content sha256 when
    small, else the modification time (a re-downloaded or edited file gets a new one).
    """
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.name.endswith((".safetensors", ".safetensors.index.json")))
    if not files:
        raise UserError(f"no .safetensors weights in {folder}; point at the model's folder (with config.json)")
    identity = []
    for p in files:
        st = p.stat()
        record: dict[str, Any] = {"name": p.name, "size": st.st_size}
        if st.st_size <= _SMALL_SOURCE:
            record["sha256"] = _sha256_file(p)
        else:
            record["mtime_ns"] = st.st_mtime_ns
        identity.append(record)
    return identity


def cache_key(identity: list[dict[str, Any]], model_config: dict[str, Any], config: QuantConfig,
              model_class: str) -> str:
    """sha256 over everything that changes the quantized tensors (config must be resolved)."""
    if config.skip is None:
        raise ValueError("cache_key needs a resolved QuantConfig (config.resolved(model))")
    payload = {
        "format": CACHE_FORMAT, "class": model_class, "source": identity, "config": model_config,
        "scheme": config.scheme, "compute_dtype": str(config.compute_dtype), "skip": list(config.skip),
        "library": scheme_library(config.scheme),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------ the store


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split tied tensors (T5's shared / embed_tokens) into one stored copy + aliases.

    safetensors refuses tensors sharing memory; partial views are copied instead.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        view = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if view in seen:
            aliases[name] = seen[view]
            continue
        if ptr in storages or not t.is_contiguous():
            t = t.contiguous().clone()
        storages.add(t.untyped_storage().data_ptr())
        seen[view] = name
        kept[name] = t
    return kept, aliases


def _load_aligned(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file into 64-byte-aligned CPU tensors, one tensor at a time.

    safetensors 0.8 hands out tensors at arbitrary byte offsets; torch's CPU int8 kernel
    that quanto uses for bf16 (`_weight_int8pack_mm`) crashes (general protection fault)
    on such weights. A copy per misaligned tensor keeps the peak at the file size + one tensor.
    """
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            tensors[name] = t if t.data_ptr() % 64 == 0 else t.clone()
    return tensors


def default_cache_root() -> Path:
    """$THREEDIS_CACHE/quantized, else ~/.cache/threedis/quantized."""
    from threedis.engine.tiny_rules import cache_root

    return cache_root() / "quantized"


class QuantCache:
    """A folder of quantized models keyed by `cache_key`; state lives on the object only."""

    def __init__(self, root: str | os.PathLike[str], verify: Verify = "full") -> None:
        if verify not in ("full", "quick"):
            raise UserError(f"cache verify mode {verify!r}: use 'full' or 'quick'")
        self.root = Path(root)
        self.verify = verify

    def path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The entry's tensors and meta, or None on a miss; a bad entry is deleted (-> None)."""
        entry = self.path(key)
        if not entry.exists():
            return None
        try:
            meta = self._check(entry, key)
            tensors = _load_aligned(entry / WEIGHTS_FILE)
        except _BadEntry as exc:
            self.discard(key, str(exc))
            return None
        except Exception as exc:  # unreadable safetensors despite a good hash: still never used
            self.discard(key, f"cannot read {WEIGHTS_FILE}: {type(exc).__name__}: {exc}")
            return None
        for name, target in meta.get("aliases", {}).items():
            if target not in tensors:
                self.discard(key, f"alias {name} -> {target} names no stored tensor")
                return None
            tensors[name] = tensors[target]
        return tensors, meta

    def _check(self, entry: Path, key: str) -> dict[str, Any]:
        try:
            meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise _BadEntry(f"unreadable {META_FILE}: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            raise _BadEntry(f"{META_FILE} is for another key or cache format")
        record = meta.get("files", {}).get(WEIGHTS_FILE, {})
        weights = entry / WEIGHTS_FILE
        if not weights.is_file() or weights.stat().st_size != record.get("size"):
            raise _BadEntry(f"{WEIGHTS_FILE} missing or its size differs from {META_FILE}")
        if self.verify == "full":
            ok = _sha256_file(weights) == record.get("sha256")
        else:
            ok = _quick_fingerprint(weights) == record.get("quick")
        if not ok:
            raise _BadEntry(f"{WEIGHTS_FILE} does not match its {self.verify} hash in {META_FILE}")
        return meta

    def write(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        """Store an entry atomically (temp folder + rename) and return its folder."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        stored, aliases = _dedupe(tensors)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=self.root))
        try:
            weights = tmp / WEIGHTS_FILE
            save_file(stored, weights, metadata={"threedis_key": key})
            del stored
            files = {WEIGHTS_FILE: {"size": weights.stat().st_size, "sha256": _sha256_file(weights),
                                    "quick": _quick_fingerprint(weights)}}
            full = {**meta, "format": CACHE_FORMAT, "key": key, "aliases": aliases, "files": files,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True, default=str), encoding="utf-8")
            for name in (WEIGHTS_FILE, META_FILE):
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            target = self.path(key)
            if target.exists():
                self.discard(key, "replaced by a fresh build")
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():
                    raise
                # a concurrent writer won the race: keep theirs if it checks out
                try:
                    self._check(target, key)
                except _BadEntry:
                    self.discard(key, "concurrent write left a bad entry")
                    os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.path(key)

    def discard(self, key: str, reason: str) -> None:
        """Delete an entry (renamed away first, so no reader sees it half-deleted)."""
        entry = self.path(key)
        if not entry.exists():
            return
        log.warning("quantized-weight cache entry %s discarded: %s", entry, reason)
        try:
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{key[:12]}-", dir=self.root))
        except OSError:  # a read-only cache: the entry stays, and read() keeps refusing it
            return
        try:
            os.rename(entry, trash / "entry")
        except OSError:
            pass
        shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------ loading


def _read_config(folder: Path, model_cls: type[nn.Module]) -> dict[str, Any]:
    """config.json, checked against the real model's before a skeleton is built from it."""
    file = folder / "config.json"
    if not file.is_file():
        raise UserError(f"no config.json in {folder}; point at the model's folder "
                        f"(e.g. the checkpoint's transformer/ or text_encoder_2/)")
    ref = CLASS_CONFIGS.get(model_cls.__name__)
    config = read_component_config(folder.name, file, ref) if ref else read_json(folder.name, file)
    config.pop("_name_or_path", None)
    return config


def _skeleton(model_cls: type[nn.Module], folder: Path) -> nn.Module:
    """The model with every parameter on `meta` (buffers real), from config.json alone."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if hasattr(model_cls, "load_config") and hasattr(model_cls, "from_config"):  # diffusers
            return model_cls.from_config(model_cls.load_config(folder))
        config_class = getattr(model_cls, "config_class", None)  # transformers
        if config_class is None:
            raise TypeError(f"{model_cls.__name__} is neither a diffusers nor a transformers model class")
        return model_cls(config_class.from_pretrained(folder))


def _restore(skeleton: nn.Module, cfg: QuantConfig, tensors: dict[str, torch.Tensor],
             meta: dict[str, Any]) -> nn.Module:
    convert_skeleton(skeleton, cfg)
    if cfg.scheme.startswith("quanto-"):
        from optimum.quanto import quantization_map

        if quantization_map(skeleton) != meta.get("quantization_map"):
            raise _BadEntry("quanto quantization map differs from the skeleton's")
    model = load_quantized_state(skeleton, cfg, tensors)
    if quantized_module_names(model) != meta.get("quantized"):
        raise _BadEntry("quantized modules differ from those recorded in meta.json")
    return model


def load_quantized(
    model_cls: type[nn.Module],
    source_path: str | os.PathLike[str],
    subfolder: str | None,
    scheme: str | QuantConfig,
    cache: QuantCache,
    loader: Callable[[], nn.Module],
    work_device: torch.device | str | None = None,
) -> LoadResult:
    """A quantized model from the cache, or from `loader()` + quantization on a miss.

    `loader` loads the float source model (any device; CPU keeps the cache portable) and
    is called only on a miss. Plain bf16/fp16/fp32 schemes bypass the cache (the source
    is already that). work_device: see quantize.apply_quantization (a CUDA device makes
    a miss fast; the entry is the same format). Returns LoadResult(model, hit, entry);
    a hit is on the CPU.
    """
    cfg = QuantConfig(scheme) if isinstance(scheme, str) else scheme
    folder = Path(source_path) / subfolder if subfolder else Path(source_path)
    if cfg.is_plain:
        return LoadResult(apply_quantization(_checked(loader(), model_cls), cfg), False, None)
    model_config = _read_config(folder, model_cls)
    with loading_component(folder.name, folder):
        identity = source_identity(folder)
        skeleton = _skeleton(model_cls, folder)
    cfg = cfg.resolved(skeleton)
    key = cache_key(identity, model_config, cfg, model_cls.__name__)
    found = cache.read(key)
    if found is not None:
        try:
            return LoadResult(_restore(skeleton, cfg, *found), True, cache.path(key))
        except Exception as exc:  # whatever the reason, a bad entry is rebuilt, never used
            cache.discard(key, f"tensors do not fit {model_cls.__name__}: {type(exc).__name__}: {exc}")
    del skeleton, found
    model = apply_quantization(_checked(loader(), model_cls), cfg, work_device)
    meta: dict[str, Any] = {
        "scheme": cfg.scheme, "compute_dtype": str(cfg.compute_dtype), "skip": list(cfg.skip or ()),
        "model_class": model_cls.__name__, "config": model_config, "source": identity,
        "library": scheme_library(cfg.scheme), "quantized": quantized_module_names(model),
    }
    if cfg.scheme.startswith("quanto-"):
        from optimum.quanto import quantization_map

        meta["quantization_map"] = quantization_map(model)
    from safetensors import SafetensorError

    try:
        entry: Path | None = cache.write(key, model.state_dict(), meta)
    except (OSError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(f"quantized-weight cache {cache.root} cannot be written ({first}); the {model_cls.__name__} "
                      f"is quantized again at its next load, which only costs time", ThreedisWarning, stacklevel=2)
        entry = None
    return LoadResult(model, False, entry)


def _checked(model: nn.Module, model_cls: type[nn.Module]) -> nn.Module:
    if not isinstance(model, model_cls):
        raise TypeError(f"loader returned {type(model).__name__}, expected {model_cls.__name__}")
    return model
