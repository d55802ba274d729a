"""Text encoding for the detail renderer (SPEC section 2), with an on-disk cache.

T5-XXL is ~9.5 GB and its output depends only on the prompt text, so each
prompt's kept chunk is cached on disk and the encoders are loaded only when a
prompt misses: re-rendering with a new seed, new boxes or a new schedule never
touches T5 again. Prompts are cached one by one, so editing one instance's
description re-encodes only that prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterator, Protocol, Sequence

import torch

from threedis.engine import loading
from threedis.engine.compute import T5_MAX_LENGTH, TEXT_BATCH  # the encoder's own numbers (compute.py)
from threedis.engine.config_check import read_json
from threedis.engine.errors import ThreedisWarning, UserError
from threedis.engine.loading import CLIP_PARTS, T5_PARTS, TextEncoders

__all__ = ["EncodedPrompts", "EncoderAccess", "EntrySpec", "PromptCache", "PromptEncoder", "encoder_identity",
           "T5_MAX_LENGTH", "TEXT_BATCH"]

log = logging.getLogger(__name__)

_MEMO_LIMIT = 64  # prompts kept in memory per encoder (a few MB each at chunk 200)


@dataclass(frozen=True)
class EncodedPrompts:
    """The text side of one layout.

    embeds: [1, (N+1)*chunk, D] global chunk first; pooled: [1, P] (CLIP, global prompt);
    text_ids: [(N+1)*chunk, 3] zeros; token_counts: real T5 tokens (with EOS) per prompt.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    chunk: int
    prompts: tuple[str, ...]
    token_counts: tuple[int, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.prompts)

    def global_only(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [1, chunk, D], text_ids [chunk, 3]): the text after the hard-control window."""
        return self.embeds[:, : self.chunk], self.text_ids[: self.chunk]

    @property
    def truncated(self) -> list[int]:
        """Indexes of prompts whose tokens did not all fit into the kept chunk."""
        return [i for i, n in enumerate(self.token_counts) if n > self.chunk]


def _hash_update_file(digest: "hashlib._Hash", path: Path, root: Path) -> None:
    stat = path.stat()
    digest.update(f"{path.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    if path.name.endswith(".json") and stat.st_size < (1 << 22):
        digest.update(hashlib.sha256(path.read_bytes()).digest())


def encoder_identity(root: Path, parts: Sequence[str]) -> str:
    """Cheap fingerprint of an encoder on disk: its path, config/index contents, weight sizes and mtimes.

    Reading 9.5 GB of T5 weights to hash them would cost more than encoding, so a
    replaced weight file is noticed by its size or modification time instead.
    """
    digest = hashlib.sha256(str(Path(root).resolve()).encode())
    for part in parts:
        folder = Path(root) / part
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            _hash_update_file(digest, path, Path(root))
    return digest.hexdigest()[:32]


class EncoderAccess(Protocol):
    """Where the encoders come from when a runtime manages them (threedis.engine.runtime.ModelManager)."""

    loads: dict[str, int]

    def use(self, key: str) -> ContextManager[Any]: ...      # "t5" | "clip": the model, placed to run
    def tokenizer(self, key: str) -> Any: ...
    def run_device(self, key: str) -> torch.device: ...
    def format_tag(self, key: str) -> str: ...               # weights format + device: part of the cache key


_ENTRY_FORMAT = "2"  # bump when an entry's tensors or metadata change

Entry = tuple[dict[str, torch.Tensor], dict[str, str]]


@dataclass(frozen=True)
class EntrySpec:
    """What a usable entry holds: one tensor `name` of `shape` and `dtype` (from the encoder config and the request)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def _content_hash(key: str, name: str, tensor: torch.Tensor) -> str:
    """sha256 over the entry's key, tensor name, dtype, shape and bytes: flipped bytes or a swapped file show."""
    digest = hashlib.sha256(json.dumps([key, name, str(tensor.dtype), list(tensor.shape)]).encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _entry_problem(key: str, entry: Entry, spec: EntrySpec) -> str | None:
    """Why a read entry must not be used (None if it may)."""
    tensors, meta = entry
    if meta.get("format") != _ENTRY_FORMAT or meta.get("key") != key:
        return "written for another key or by another version"
    if set(tensors) != {spec.name}:
        return f"holds {sorted(tensors)}, expected [{spec.name!r}]"
    tensor = tensors[spec.name]
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        return f"holds {str(tensor.dtype)} {tuple(tensor.shape)}, expected {str(spec.dtype)} {spec.shape}"
    if meta.get("sha256") != _content_hash(key, spec.name, tensor):
        return "content does not match its hash"
    if not bool(torch.isfinite(tensor).all()):
        return "holds non-finite values"
    tokens = meta.get("tokens")
    if tokens is not None and not (tokens.isdigit() and 1 <= int(tokens) <= T5_MAX_LENGTH):
        return f"token count {tokens!r} out of range"
    return None


class PromptCache:
    """One safetensors file per (encoder, prompt, chunk, format) key, each checked before use.

    An entry is used only if it was written for its key (a renamed or swapped file is
    not), its tensor has the shape and dtype the encoder config and the request call
    for, and its bytes match the content hash stored beside them; anything else is
    deleted and rebuilt. A cache folder that cannot be written (read-only, full) only
    costs speed: one ThreedisWarning per cache, and prompts are encoded every time.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.write_failed: str | None = None  # why the last write failed (warned about once per cache)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str, spec: EntrySpec) -> Entry | None:
        """The entry for `key` if it exists and passes every check; a bad one is deleted (-> None)."""
        from safetensors import safe_open

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            problem = _entry_problem(key, (tensors, meta), spec)
        except Exception as exc:  # noqa: BLE001 - truncated, garbled or unreadable: encode again
            problem = f"unreadable ({type(exc).__name__})"
        if problem is None:
            return tensors, meta
        log.warning("prompt cache entry %s rebuilt: %s", path, problem)
        with contextlib.suppress(OSError):  # a read-only cache keeps it; it is never used
            path.unlink()
        return None

    def put(self, key: str, name: str, tensor: torch.Tensor, meta: dict[str, str]) -> None:
        """Store one entry atomically; a failed write is skipped, with one warning per cache object."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        tensor = tensor.detach().cpu().contiguous()
        meta = {**meta, "format": _ENTRY_FORMAT, "key": key, "sha256": _content_hash(key, name, tensor)}
        tmp = self.folder / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({name: tensor}, str(tmp), metadata=meta)
            os.replace(tmp, self._path(key))  # atomic: a reader never sees half a file
        except (OSError, SafetensorError) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            first_failure = self.write_failed is None
            self.write_failed = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if first_failure:
                warnings.warn(f"prompt-embedding cache {self.folder} cannot be written ({self.write_failed}); "
                              f"prompts are encoded without it, which only costs speed", ThreedisWarning,
                              stacklevel=2)


class PromptEncoder:
    """Encodes prompt lists; loads CLIP/T5 only on a cache miss and keeps them until `release()`.

    source: checkpoint folder to load encoders from (and to fingerprint for the disk
    cache); text: encoders already in memory (tests, from_components). With neither
    a source nor a cache folder, only the in-memory memo applies.
    """

    def __init__(
        self,
        source: Path | None,
        device: torch.device,
        dtype: torch.dtype,
        cache_dir: Path | None = None,
        text: TextEncoders | None = None,
        models: EncoderAccess | None = None,
    ) -> None:
        self.source = Path(source) if source is not None else None
        self.device = torch.device(device)
        self.dtype = dtype
        self.text = text or TextEncoders()
        self.models = models
        self.cache = PromptCache(cache_dir) if cache_dir is not None and source is not None else None
        self._loads = {"clip": 0, "t5": 0}
        self._memo: dict[str, Entry] = {}
        self._identity: dict[str, str] = {}
        self._widths: dict[str, int] = {}

    @property
    def loads(self) -> dict[str, int]:
        """How often each encoder was loaded (reported, tested)."""
        if self.models is not None:
            return {k: int(self.models.loads.get(k, 0)) for k in ("clip", "t5")}
        return self._loads

    # -- keys ------------------------------------------------------------------

    def _encoder_id(self, which: str) -> str:
        if which not in self._identity:
            if self.source is not None:
                parts = T5_PARTS if which == "t5" else CLIP_PARTS
                self._identity[which] = encoder_identity(self.source, parts)
            else:  # models handed in directly: identity of the Python objects (memo only)
                if self.models is not None:
                    model = self.models.loaded(which)
                else:
                    model = self.text.t5 if which == "t5" else self.text.clip
                self._identity[which] = f"object-{id(model)}"
        return self._identity[which]

    def _key(self, which: str, prompt: str, chunk: int) -> str:
        if self.models is not None:
            fmt = [self.models.format_tag(which)]
        else:
            fmt = [str(self.dtype), self.device.type]
        fields = [which, self._encoder_id(which), *fmt, str(chunk), prompt]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:40]

    def _width(self, which: str) -> int:
        """T5's d_model or CLIP's hidden_size, from the encoder's config.json (the disk cache has a source)."""
        if which not in self._widths:
            part, field, default = ("text_encoder_2", "d_model", 512) if which == "t5" else \
                ("text_encoder", "hidden_size", 512)  # the transformers config defaults
            self._widths[which] = int(read_json(part, self.source / part / "config.json").get(field, default))
        return self._widths[which]

    def _spec(self, which: str, chunk: int) -> EntrySpec:
        """What a disk entry for this encoder and request must hold."""
        dtype = self.models.compute_dtype(which) if hasattr(self.models, "compute_dtype") else self.dtype
        if which == "t5":
            return EntrySpec("embeds", (chunk, self._width("t5")), dtype)
        return EntrySpec("pooled", (self._width("clip"),), dtype)

    def _lookup(self, key: str, which: str, chunk: int) -> Entry | None:
        hit = self._memo.get(key)  # made in this process: trusted
        if hit is None and self.cache is not None:
            hit = self.cache.get(key, self._spec(which, chunk))
            if hit is not None:
                self._remember(key, hit)
        return hit

    def _remember(self, key: str, entry: Entry) -> None:
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.pop(next(iter(self._memo)))
        self._memo[key] = entry

    def _store(self, key: str, name: str, tensor: torch.Tensor, meta: dict[str, str]) -> Entry:
        entry = ({name: tensor.detach().cpu()}, meta)
        self._remember(key, entry)
        if self.cache is not None:
            self.cache.put(key, name, entry[0][name], meta)
        return entry

    # -- models ----------------------------------------------------------------

    def _need(self, which: str) -> tuple[Any, Any]:
        text = self.text
        if which == "t5" and text.t5 is None:
            self._require_source("T5")
            text.t5, text.t5_tokenizer = loading.load_t5(self.source, self.dtype, self.device)
            self._loads["t5"] += 1
        if which == "clip" and text.clip is None:
            self._require_source("CLIP")
            text.clip, text.clip_tokenizer = loading.load_clip(self.source, self.dtype, self.device)
            self._loads["clip"] += 1
        return (text.t5, text.t5_tokenizer) if which == "t5" else (text.clip, text.clip_tokenizer)

    @contextlib.contextmanager
    def _using(self, which: str) -> Iterator[tuple[Any, Any, torch.device]]:
        """(model, tokenizer, input device) for one encoding stage.

        With a runtime, the model is placed (or loaded) for the stage and leaves
        afterwards, per profile; without one, the encoders this object loaded stay.
        """
        if self.models is None:
            model, tokenizer = self._need(which)
            yield model, tokenizer, self.device
            return
        with self.models.use(which) as model:
            yield model, self.models.tokenizer(which), self.models.run_device(which)

    def _require_source(self, what: str) -> None:
        if self.source is None:
            raise UserError(f"the {what} text encoder is needed (prompt not cached) but none was given or can be loaded")

    def release(self) -> None:
        """Drop encoders this object loaded itself; the cache keeps their results."""
        if self.source is not None:
            self.text = TextEncoders()

    # -- encoding --------------------------------------------------------------

    @torch.no_grad()
    def _encode_t5(self, prompts: list[str], chunk: int) -> list[tuple[torch.Tensor, int]]:
        """Batch of prompts -> per prompt ([chunk, D] embeddings, real token count)."""
        out: list[tuple[torch.Tensor, int]] = []
        with self._using("t5") as (model, tokenizer, device):
            for start in range(0, len(prompts), TEXT_BATCH):  # bounded activations, see TEXT_BATCH
                batch = prompts[start: start + TEXT_BATCH]
                tokens = tokenizer(
                    batch, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, return_tensors="pt"
                )
                # ids: [B, 512] -> hidden: [B, 512, D]; no attention mask, as FLUX was trained
                hidden = model(tokens.input_ids.to(device), output_hidden_states=False)[0]
                counts = tokens.attention_mask.sum(1).tolist()
                out += [(hidden[i, :chunk].cpu(), int(counts[i])) for i in range(len(batch))]
                del hidden
            del model
        return out

    @torch.no_grad()
    def _encode_clip(self, prompt: str) -> torch.Tensor:
        with self._using("clip") as (model, tokenizer, device):
            ids = tokenizer(
                [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids  # [1, 77]
            pooled = model(ids.to(device), output_hidden_states=False).pooler_output[0].cpu()  # [P]
            del model
        return pooled

    def encode(self, prompts: Sequence[str], chunk: int = 200) -> EncodedPrompts:
        """[global, inst_1..inst_N] -> EncodedPrompts; the encoders run at most once, batched."""
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= T5_MAX_LENGTH:
            raise UserError(f"chunk must be a whole number of T5 tokens in 1..{T5_MAX_LENGTH}, got {chunk!r}")
        prompts = list(prompts)
        if not prompts:
            raise UserError("no prompts to encode: a layout needs at least its global prompt")
        keys = [self._key("t5", p, chunk) for p in prompts]
        entries = {key: self._lookup(key, "t5", chunk) for key in set(keys)}
        missing = {key: p for key, p in zip(keys, prompts) if entries[key] is None}
        if missing:
            batch_keys = list(missing)
            for key, (emb, count) in zip(batch_keys, self._encode_t5([missing[k] for k in batch_keys], chunk)):
                entries[key] = self._store(key, "embeds", emb, {"tokens": str(count)})
        clip_key = self._key("clip", prompts[0], 0)
        clip_entry = self._lookup(clip_key, "clip", 0)
        if clip_entry is None:
            clip_entry = self._store(clip_key, "pooled", self._encode_clip(prompts[0]), {})

        chunks = [entries[key][0]["embeds"] for key in keys]  # each [chunk, D]
        embeds = torch.cat(chunks, dim=0)[None].to(self.device)  # [1, (N+1)*chunk, D]
        pooled = clip_entry[0]["pooled"][None].to(self.device)  # [1, P]
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=embeds.dtype)
        counts = tuple(int(entries[key][1].get("tokens", "0")) for key in keys)
        return EncodedPrompts(embeds, pooled, text_ids, chunk, tuple(prompts), counts)
