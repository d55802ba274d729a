"""Caches that cannot be written only cost speed; prompt-cache entries that are not what they claim are rebuilt.

"Full" is simulated by making the write raise ENOSPC (or safetensors' own error for
it). "Read-only" uses chmod when the tests run as a normal user; as root, where
chmod does not stop writes, the writes into that folder are made to raise EACCES.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from threedis.engine import loading
from threedis.engine.encoding import PromptCache, PromptEncoder
from threedis.engine.errors import ThreedisWarning

PROMPTS = ["a sunny garden, a red bird, a blue jay", "a red bird", "a blue jay on a branch"]
CHUNK = 16


def _encoder(root: Path, cache: Path | None) -> PromptEncoder:
    return PromptEncoder(root, torch.device("cpu"), torch.float32, cache_dir=cache)


@pytest.fixture(scope="module")
def expected(tiny_flux_dir: Path):
    """The encoding without any disk cache: what every cached or uncached run must give."""
    return _encoder(tiny_flux_dir, None).encode(PROMPTS, CHUNK)


def _same(text, want) -> None:
    # Another PromptEncoder loads its own copy of the encoders: compare within rounding.
    torch.testing.assert_close(text.embeds, want.embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text.pooled, want.pooled, rtol=1e-5, atol=1e-6)
    assert text.token_counts == want.token_counts


def _threedis_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ThreedisWarning)]


def _read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `folder` unwritable: chmod for a normal user; for root, writes into it raise EACCES."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    inside = str(folder)

    def refuse(real):
        def call(*args, **kwargs):
            paths = [str(a) for a in args if isinstance(a, (str, os.PathLike))] + [str(kwargs.get("dir", ""))]
            if any(p.startswith(inside) for p in paths):
                raise PermissionError(errno.EACCES, "Permission denied", paths[0])
            return real(*args, **kwargs)
        return call

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", refuse(safetensors.torch.save_file))
    monkeypatch.setattr(os, "replace", refuse(os.replace))
    monkeypatch.setattr(os, "rename", refuse(os.rename))
    monkeypatch.setattr(tempfile, "mkdtemp", refuse(tempfile.mkdtemp))
    monkeypatch.setattr(Path, "unlink", refuse(Path.unlink))


@pytest.fixture
def writable_again(tmp_path: Path) -> Iterator[None]:
    yield
    for folder in [tmp_path, *tmp_path.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o755)  # so pytest can delete what a chmod test left


def _full(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    import safetensors.torch

    def no_space(*args, **kwargs):
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)


# ------------------------------------------------------------------ prompt cache: unwritable


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device")],
                         ids=["ENOSPC", "SafetensorError"])
def test_full_prompt_cache_encodes_uncached_with_one_warning(tiny_flux_dir, tmp_path, monkeypatch, expected, error):
    _full(monkeypatch, error)
    encoder = _encoder(tiny_flux_dir, tmp_path / "prompts")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _same(encoder.encode(PROMPTS, CHUNK), expected)
        encoder.encode(["another prompt", "more"], CHUNK)  # more misses: no second warning
    messages = _threedis_warnings(caught)
    assert len(messages) == 1 and "cannot be written" in messages[0] and "only costs speed" in messages[0]
    assert not list((tmp_path / "prompts").glob("*")), "no entry and no temp file left"


def test_read_only_prompt_cache_still_serves_its_entries(tiny_flux_dir, tmp_path, monkeypatch, expected,
                                                         writable_again):
    cache = tmp_path / "prompts"
    _encoder(tiny_flux_dir, cache).encode(PROMPTS[:2], CHUNK)  # two of three prompts cached
    (sorted(cache.glob("*.safetensors"))[0]).write_bytes(b"garbage")  # and one of them broken
    _read_only(cache, monkeypatch)
    encoder = _encoder(tiny_flux_dir, cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _same(encoder.encode(PROMPTS, CHUNK), expected)
    assert len(_threedis_warnings(caught)) == 1


# ------------------------------------------------------------------ prompt cache: corrupted entries


def _entry(encoder: PromptEncoder, cache: Path, prompt: str) -> Path:
    return cache / f"{encoder._key('t5', prompt, CHUNK)}.safetensors"


def _flip_a_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[(header + len(data)) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_suffix(".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _forge(path: Path, key: str, tensor: torch.Tensor) -> None:
    """An entry for `key` holding `tensor`, with a content hash that matches it (only the checks can refuse it)."""
    PromptCache(path.parent).put(key, "embeds", tensor, {"tokens": "5"})


@pytest.mark.parametrize("damage", ["flipped byte", "swapped entries", "nan", "wrong dtype", "wrong shape",
                                    "wrong width", "old format", "no hash", "bad token count"])
def test_corrupted_prompt_entry_is_rebuilt(tiny_flux_dir, tmp_path, expected, damage):
    cache = tmp_path / "prompts"
    first = _encoder(tiny_flux_dir, cache)
    first.encode(PROMPTS, CHUNK)
    target = _entry(first, cache, PROMPTS[1])
    key = target.name.removesuffix(".safetensors")
    good = load_file(str(target))["embeds"]
    if damage == "flipped byte":
        _flip_a_data_byte(target)
    elif damage == "swapped entries":
        _swap(target, _entry(first, cache, PROMPTS[2]))
    elif damage == "nan":
        _forge(target, key, torch.where(torch.arange(good.numel()).reshape(good.shape) == 3, float("nan"), good))
    elif damage == "wrong dtype":
        _forge(target, key, good.double())
    elif damage == "wrong shape":
        _forge(target, key, torch.cat([good, good[:3]]))
    elif damage == "wrong width":
        _forge(target, key, good[:, :-1].contiguous())
    elif damage == "old format":
        save_file({"embeds": good}, str(target), metadata={"tokens": "5"})
    elif damage == "no hash":
        save_file({"embeds": good}, str(target), metadata={"tokens": "5", "format": "2", "key": key})
    elif damage == "bad token count":
        PromptCache(cache).put(key, "embeds", good, {"tokens": "-3"})
    again = _encoder(tiny_flux_dir, cache)
    _same(again.encode(PROMPTS, CHUNK), expected)
    assert again.loads["t5"] == 1, "the damaged entry must be rebuilt, not used"
    third = _encoder(tiny_flux_dir, cache)
    _same(third.encode(PROMPTS, CHUNK), expected)
    assert third.loads == {"clip": 0, "t5": 0}, "the rebuilt entries pass the checks"


def test_damaged_clip_entry_is_rebuilt(tiny_flux_dir, tmp_path, expected):
    cache = tmp_path / "prompts"
    first = _encoder(tiny_flux_dir, cache)
    first.encode(PROMPTS, CHUNK)
    _flip_a_data_byte(cache / f"{first._key('clip', PROMPTS[0], 0)}.safetensors")
    again = _encoder(tiny_flux_dir, cache)
    _same(again.encode(PROMPTS, CHUNK), expected)
    assert again.loads == {"clip": 1, "t5": 0}


# ------------------------------------------------------------------ quantized-weight cache: unwritable


def _quantized(tiny_flux_dir: Path, cache_root: Path, calls: list[int]):
    pytest.importorskip("optimum.quanto")
    from transformers import T5EncoderModel

    from threedis.engine.quant_cache import QuantCache, load_quantized

    def loader():
        calls.append(1)
        return T5EncoderModel.from_pretrained(tiny_flux_dir / "text_encoder_2", dtype=torch.float32)

    return load_quantized(T5EncoderModel, tiny_flux_dir, "text_encoder_2", "quanto-int8", QuantCache(cache_root),
                          loader)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device")],
                         ids=["ENOSPC", "SafetensorError"])
def test_full_quantized_cache_uses_the_fresh_model(tiny_flux_dir, tmp_path, monkeypatch, error):
    _full(monkeypatch, error)
    calls: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _quantized(tiny_flux_dir, tmp_path / "q", calls)
    assert not result.hit and result.entry is None and calls == [1]
    assert type(result.model.encoder.block[0].layer[0].SelfAttention.q).__name__ == "QLinear"
    messages = _threedis_warnings(caught)
    assert len(messages) == 1 and "cannot be written" in messages[0]
    assert not list((tmp_path / "q").glob(".tmp-*")), "no temp folder left"


def test_read_only_quantized_cache(tiny_flux_dir, tmp_path, monkeypatch, writable_again):
    root = tmp_path / "q"
    calls: list[int] = []
    built = _quantized(tiny_flux_dir, root, calls)
    weights = built.entry / "model.safetensors"
    _flip_a_data_byte(weights)  # a bad entry that a read-only cache cannot even delete
    _read_only(root, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _quantized(tiny_flux_dir, root, calls)
    assert not again.hit and again.entry is None and calls == [1, 1]
    assert len(_threedis_warnings(caught)) == 1
    shutil.rmtree(root, ignore_errors=True)


def test_loading_component_keeps_user_errors_and_wraps_the_rest(tmp_path):
    from threedis.engine.errors import UserError

    with pytest.raises(UserError, match=r"^vae: /x/vae: cannot be loaded \(KeyError: 'latent'\)"):
        with loading.loading_component("vae", Path("/x/vae")):
            raise KeyError("latent")
    with pytest.raises(UserError, match="^already clear$"):
        with loading.loading_component("vae", Path("/x/vae")):
            raise UserError("already clear")
