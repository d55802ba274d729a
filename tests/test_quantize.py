"""Quantization schemes and the quantized-weight cache, on tiny FLUX and T5 models (CPU).

References are independent of the code under test: the float32 model's own output
(computed in float64 for single layers), module types and dtypes as the libraries
define them, and the module names listed here by hand.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")
pytest.importorskip("optimum.quanto")

import bitsandbytes as bnb  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from optimum.quanto import QTensor  # noqa: E402
from optimum.quanto.nn import QLinear  # noqa: E402
from transformers import T5Config, T5EncoderModel  # noqa: E402

from threedis.engine.errors import UserError  # noqa: E402
from threedis.engine.quant_cache import (  # noqa: E402
    META_FILE,
    WEIGHTS_FILE,
    QuantCache,
    cache_key,
    load_quantized,
    source_identity,
)
from threedis.engine.quantize import (  # noqa: E402
    QUANT_SCHEMES,
    QuantConfig,
    apply_quantization,
    quantized_module_names,
)

from closeness import assert_same_weights  # noqa: E402

# Every linear has in_features % 64 == 0 (bitsandbytes' CPU NF4 kernel needs whole blocks
# per row; the 32-wide layers of tiny_flux_dir would leave NF4 nothing to quantize) and
# single-block proj_out has 64 + 4*64 = 320 inputs (quanto int4 then picks groups of 64).
FLUX_KW = dict(patch_size=1, in_channels=128, out_channels=64, num_layers=2, num_single_layers=2,
               attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
               pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
T5_KW = dict(vocab_size=256, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
             relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

# Relative L2 error of the whole model's output vs float32 (compute in float32).
# Measured: flux / t5  fp8 .003/.041  int8 .0005/.0085  nf4 .012/.13  quanto-int8 .0005/.0086
# quanto-int4 .0085/.13  quanto-fp8 .0033/.038. FLUX's output is dominated by its
# unquantized embedders and proj_out, hence the smaller errors.
MODEL_BOUND = {
    "fp8": {"flux": 0.02, "t5": 0.10}, "int8": {"flux": 0.005, "t5": 0.03},
    "nf4": {"flux": 0.05, "t5": 0.25}, "quanto-int8": {"flux": 0.005, "t5": 0.03},
    "quanto-int4": {"flux": 0.05, "t5": 0.25}, "quanto-fp8": {"flux": 0.02, "t5": 0.10},
}
# Per quantized linear vs its float64 output. Measured max: fp8 .027, int8 .006, nf4 .096,
# quanto-int8 .006, quanto-int4 .092, quanto-fp8 .026.
LAYER_BOUND = {"fp8": 0.05, "int8": 0.015, "nf4": 0.13, "quanto-int8": 0.015,
               "quanto-int4": 0.13, "quanto-fp8": 0.05}

# Linears every scheme keeps in high precision, written out by hand.
FLUX_KEPT = {"x_embedder", "context_embedder", "proj_out", "norm_out.linear",
             *(f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "guidance_embedder",
                                                            "text_embedder") for i in (1, 2))}
FLUX_MODULATION = {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                   "transformer_blocks.1.norm1.linear", "transformer_blocks.1.norm1_context.linear",
                   "single_transformer_blocks.0.norm.linear", "single_transformer_blocks.1.norm.linear"}
T5_KEPT = {"encoder.block.0.layer.1.DenseReluDense.wo", "encoder.block.1.layer.1.DenseReluDense.wo"}

SUBFOLDER = {"flux": "transformer", "t5": "text_encoder_2"}
MODEL_CLS = {"flux": FluxTransformer2DModel, "t5": T5EncoderModel}


def _write_checkpoint(root: Path, seed: int) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        FluxTransformer2DModel(**FLUX_KW).save_pretrained(root / "transformer")
        T5EncoderModel(T5Config(**T5_KW)).save_pretrained(root / "text_encoder_2")
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_checkpoint(tmp_path_factory.mktemp("quant-ckpt"), seed=0)


def _loader(root: Path, which: str, dtype: torch.dtype, calls: list[int]) -> Callable[[], nn.Module]:
    def load() -> nn.Module:
        calls.append(1)
        return MODEL_CLS[which].from_pretrained(root / SUBFOLDER[which], torch_dtype=dtype).eval()
    return load


def _run(which: str, model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if which == "t5":
            ids = torch.randint(0, T5_KW["vocab_size"], (2, 20), generator=g)
            return model(input_ids=ids).last_hidden_state.float()  # [B, T, 64]
        L, T = 64, 16
        out = model(
            hidden_states=torch.randn(2, L, 128, generator=g).to(dtype),            # [B, L, C]
            encoder_hidden_states=torch.randn(2, T, 64, generator=g).to(dtype),     # [B, T, D]
            pooled_projections=torch.randn(2, 64, generator=g).to(dtype),
            timestep=torch.tensor([0.7, 0.3]), guidance=torch.tensor([3.5, 3.5]),
            img_ids=torch.randn(L, 3, generator=g), txt_ids=torch.zeros(T, 3), return_dict=False)[0]
        return out.float()  # [B, L, 64]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def float_models(ckpt: Path) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    models = {}
    for which in ("flux", "t5"):
        m = _loader(ckpt, which, torch.float32, [])()
        models[which] = (m, _run(which, m))
    return models


def _expected_quantized(which: str, model: nn.Module, scheme: str) -> set[str]:
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    kept = FLUX_KEPT if which == "flux" else T5_KEPT
    if scheme == "fp8" and which == "flux":
        kept = kept | FLUX_MODULATION  # diffusers' layerwise casting skips "norm" modules
    return linears - kept


# ------------------------------------------------------------------ schemes


@pytest.mark.parametrize("which", ["flux", "t5"])
@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_scheme_output_close_to_fp32(scheme: str, which: str, float_models) -> None:
    model, ref = float_models[which]
    q = apply_quantization(copy.deepcopy(model), QuantConfig(scheme, torch.float32))
    err = _rel(_run(which, q), ref)
    print(f"{scheme} {which}: relative error {err:.4f} (bound {MODEL_BOUND[scheme][which]})")
    assert 0 < err < MODEL_BOUND[scheme][which]  # > 0: something really was quantized


@pytest.mark.parametrize("which", ["flux", "t5"])
@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_quantized_types_and_layer_error(scheme: str, which: str, float_models) -> None:
    model, _ = float_models[which]
    q = apply_quantization(copy.deepcopy(model), QuantConfig(scheme, torch.float32))
    expected = _expected_quantized(which, model, scheme)
    assert set(quantized_module_names(q)) == expected
    g = torch.Generator().manual_seed(2)
    for name, m in q.named_modules():
        if name not in expected:
            if type(model.get_submodule(name)) is nn.Linear:
                assert type(m) is nn.Linear and m.weight.dtype == torch.float32, name
            continue
        w = m.weight
        if scheme == "nf4":
            assert isinstance(m, bnb.nn.Linear4bit) and isinstance(w, bnb.nn.Params4bit)
            assert w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4"
            assert w.numel() * 2 == m.in_features * m.out_features  # two 4-bit codes per byte
        elif scheme == "int8":
            assert isinstance(m, bnb.nn.Linear8bitLt) and isinstance(w, bnb.nn.Int8Params) and w.dtype == torch.int8
        elif scheme == "fp8":
            assert type(m) is nn.Linear and w.dtype == torch.float8_e4m3fn
        else:
            assert isinstance(m, QLinear) and isinstance(w, QTensor)
            qtype = {"quanto-int8": "qint8", "quanto-int4": "qint4", "quanto-fp8": "qfloat8_e4m3fn"}[scheme]
            assert w.qtype.name == qtype
        lin = model.get_submodule(name)
        x = torch.randn(32, lin.in_features, generator=g)  # [N, in]
        ref = nn.functional.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
        with torch.no_grad():
            err = _rel(m(x), ref)
        assert err < LAYER_BOUND[scheme], f"{name}: {err:.4f}"


@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_bf16_compute_error_near_plain_bf16(scheme: str, float_models) -> None:
    """In bf16 the rounding of bf16 itself is part of the error: compare to plain bf16's."""
    for which in ("flux", "t5"):
        model, ref = float_models[which]
        plain = _rel(_run(which, copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16), ref)
        q = apply_quantization(copy.deepcopy(model), QuantConfig(scheme, torch.bfloat16))
        err = _rel(_run(which, q, torch.bfloat16), ref)
        print(f"{scheme} {which} bf16: {err:.4f} (plain bf16 {plain:.4f})")
        assert err < plain + MODEL_BOUND[scheme][which]


def test_config_validation(float_models) -> None:
    with pytest.raises(UserError, match="unknown weights format"):
        QuantConfig("int3")
    with pytest.raises(UserError, match="compute in"):
        QuantConfig("bf16", torch.float32)
    assert QuantConfig("fp16").compute_dtype == torch.float16
    assert QuantConfig("nf4").compute_dtype == torch.bfloat16
    q = apply_quantization(copy.deepcopy(float_models["t5"][0]), QuantConfig("int8", torch.float32))
    with pytest.raises(UserError, match="already quantized"):
        apply_quantization(q, QuantConfig("nf4", torch.float32))


# ------------------------------------------------------------------ cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("which", ["flux", "t5"])
@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_cache_round_trip_is_exact(scheme: str, which: str, dtype: torch.dtype, ckpt: Path, tmp_path: Path) -> None:
    cache, calls = QuantCache(tmp_path / "cache"), []
    cfg = QuantConfig(scheme, dtype)
    fresh = load_quantized(MODEL_CLS[which], ckpt, SUBFOLDER[which], cfg, cache, _loader(ckpt, which, dtype, calls))
    assert not fresh.hit and calls == [1]
    assert (fresh.entry / WEIGHTS_FILE).is_file() and (fresh.entry / META_FILE).is_file()
    cached = load_quantized(MODEL_CLS[which], ckpt, SUBFOLDER[which], cfg, cache, _loader(ckpt, which, dtype, calls))
    assert cached.hit and calls == [1], "the loader must not run on a hit"
    assert [type(m) for m in cached.model.modules()] == [type(m) for m in fresh.model.modules()]
    assert not any(t.is_meta for t in cached.model.state_dict().values())
    assert_same_weights(cached.model, fresh.model)
    ref = _run(which, _loader(ckpt, which, torch.float32, [])())
    _assert_same_model_output(_run(which, cached.model, dtype), _run(which, fresh.model, dtype), ref)


def _assert_same_model_output(cached: torch.Tensor, fresh: torch.Tensor, ref: torch.Tensor) -> None:
    """Outputs of a cached and a fresh model with identical weights: not bit-equal across kernels.

    Their tensors can differ in layout or alignment, for which CPU kernels take other paths
    (6e-7 apart on some CPUs). Rounding of that kind stays far below the quantized model's
    own error vs the float32 model (`ref`); wrongly restored scales or modules do not.
    """
    own = _rel(fresh, ref)
    diff = _rel(cached, fresh)
    print(f"cached vs fresh {diff:.2e}, fresh vs float {own:.2e}")
    assert diff <= 0.1 * own + 1e-6


def _count_loads(ckpt: Path, cache: QuantCache, which: str = "t5", scheme: str = "int8") -> tuple[list[int], bool]:
    calls: list[int] = []
    result = load_quantized(MODEL_CLS[which], ckpt, SUBFOLDER[which], QuantConfig(scheme, torch.float32), cache,
                            _loader(ckpt, which, torch.float32, calls))
    return calls, result.hit


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    i = (header + len(data)) // 2  # inside the tensor data, not the JSON header
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("verify", ["full", "quick"])
def test_corrupt_weights_detected_and_rebuilt(verify: str, ckpt: Path, tmp_path: Path, caplog) -> None:
    cache = QuantCache(tmp_path, verify=verify)
    _count_loads(ckpt, cache)
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    _flip_middle(entry / WEIGHTS_FILE)
    with caplog.at_level(logging.WARNING, logger="threedis.engine.quant_cache"):
        calls, hit = _count_loads(ckpt, cache)
    assert (calls, hit) == ([1], False)
    assert "discarded" in caplog.text and "hash" in caplog.text
    assert _count_loads(ckpt, cache) == ([], True)  # the rebuilt entry is good


@pytest.mark.parametrize("edit", ["key", "sha256", "size", "garbage", "truncate", "missing"])
def test_bad_entry_detected_and_rebuilt(edit: str, ckpt: Path, tmp_path: Path, caplog) -> None:
    cache = QuantCache(tmp_path)
    _count_loads(ckpt, cache)
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    meta_path, weights = entry / META_FILE, entry / WEIGHTS_FILE
    meta = json.loads(meta_path.read_text())
    if edit == "key":
        meta["key"] = "0" * 64
    elif edit in ("sha256", "size"):
        meta["files"][WEIGHTS_FILE][edit] = "0" * 64 if edit == "sha256" else 1
    if edit == "garbage":
        meta_path.write_text("{not json")
    elif edit == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif edit == "missing":
        weights.unlink()
    else:
        meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="threedis.engine.quant_cache"):
        assert _count_loads(ckpt, cache) == ([1], False)
    assert "discarded" in caplog.text
    assert _count_loads(ckpt, cache) == ([], True)


def _rewrite_entry(entry: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Store `tensors` as the entry's weights with matching hashes in meta.json: only deeper checks can tell."""
    from safetensors.torch import save_file

    from threedis.engine.quant_cache import _quick_fingerprint, _sha256_file

    save_file(tensors, entry / WEIGHTS_FILE)
    meta = json.loads((entry / META_FILE).read_text())
    meta["files"][WEIGHTS_FILE] = {"size": (entry / WEIGHTS_FILE).stat().st_size,
                                   "sha256": _sha256_file(entry / WEIGHTS_FILE),
                                   "quick": _quick_fingerprint(entry / WEIGHTS_FILE)}
    (entry / META_FILE).write_text(json.dumps(meta))


def test_entry_with_wrong_tensors_rebuilt(ckpt: Path, tmp_path: Path, caplog) -> None:
    """Hashes that match but tensors that do not fit the model: caught when assigning."""
    from safetensors.torch import load_file

    cache = QuantCache(tmp_path)
    _count_loads(ckpt, cache)
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    tensors = load_file(entry / WEIGHTS_FILE)
    dropped = next(k for k in tensors if k.endswith("SCB"))
    del tensors[dropped]
    _rewrite_entry(entry, tensors)
    with caplog.at_level(logging.WARNING, logger="threedis.engine.quant_cache"):
        assert _count_loads(ckpt, cache) == ([1], False)
    assert "do not fit" in caplog.text
    assert _count_loads(ckpt, cache) == ([], True)


@pytest.mark.parametrize("scheme, suffix", [("int8", "SCB"), ("fp8", "weight")])
def test_entry_with_nan_is_rebuilt_not_blamed_on_the_checkpoint(scheme: str, suffix: str, ckpt: Path, tmp_path: Path,
                                                              caplog) -> None:
    """NaN stored under a matching hash (written from a bad copy in memory): never loaded, rebuilt from the source."""
    from safetensors.torch import load_file

    cache = QuantCache(tmp_path)
    _count_loads(ckpt, cache, scheme=scheme)
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    tensors = load_file(entry / WEIGHTS_FILE)
    name = next(k for k, t in tensors.items() if k.endswith(suffix) and t.is_floating_point())
    poisoned = tensors[name].float().flatten()
    poisoned[1] = float("nan")
    tensors[name] = poisoned.reshape(tensors[name].shape).to(tensors[name].dtype)
    _rewrite_entry(entry, tensors)
    with caplog.at_level(logging.WARNING, logger="threedis.engine.quant_cache"):
        assert _count_loads(ckpt, cache, scheme=scheme) == ([1], False)
    assert f"{name} holds NaN/Inf" in caplog.text
    assert _count_loads(ckpt, cache, scheme=scheme) == ([], True)  # the rebuilt entry is good
    rebuilt = load_file(entry / WEIGHTS_FILE)
    assert torch.isfinite(rebuilt[name].float()).all()


def test_cache_writes_leave_no_temp_folders(ckpt: Path, tmp_path: Path) -> None:
    cache = QuantCache(tmp_path)
    for scheme in ("int8", "nf4"):
        _count_loads(ckpt, cache, scheme=scheme)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and not any(n.startswith(".") for n in names)


def test_plain_scheme_bypasses_cache(ckpt: Path, tmp_path: Path) -> None:
    calls: list[int] = []
    result = load_quantized(T5EncoderModel, ckpt, "text_encoder_2", "bf16", QuantCache(tmp_path),
                            _loader(ckpt, "t5", torch.float32, calls))
    assert (result.hit, result.entry, calls) == (False, None, [1])
    assert result.model.shared.weight.dtype == torch.bfloat16 and not any(tmp_path.iterdir())


def test_key_changes_with_scheme_dtype_and_source(ckpt: Path, tmp_path: Path) -> None:
    folder = ckpt / "transformer"
    config = json.loads((folder / "config.json").read_text())
    skeleton = FluxTransformer2DModel.from_config(config)

    def key(fold: Path, scheme: str = "nf4", dtype: torch.dtype = torch.bfloat16, cfg: dict = config) -> str:
        return cache_key(source_identity(fold), cfg, QuantConfig(scheme, dtype).resolved(skeleton),
                         "FluxTransformer2DModel")

    base = key(folder)
    assert key(folder) == base
    assert len({base, key(folder, "int8"), key(folder, "quanto-int4"), key(folder, "fp8"),
                key(folder, dtype=torch.float16)}) == 5
    assert key(folder, cfg={**config, "num_layers": 3}) != base
    copy_dir = tmp_path / "copy"
    shutil.copytree(folder, copy_dir)
    assert key(copy_dir) == base  # small files are identified by content: a copy still hits
    other = _write_checkpoint(tmp_path / "other", seed=1) / "transformer"
    assert key(other) != base  # same names and sizes, other weights


def test_source_change_rebuilds(ckpt: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ckpt / "text_encoder_2", src / "text_encoder_2")
    cache = QuantCache(tmp_path / "cache")
    assert _count_loads(src, cache) == ([1], False)
    assert _count_loads(src, cache) == ([], True)
    _write_checkpoint(tmp_path / "new", seed=5)
    shutil.copy(tmp_path / "new" / "text_encoder_2" / "model.safetensors", src / "text_encoder_2" / "model.safetensors")
    assert _count_loads(src, cache) == ([1], False)


def test_tiny_flux_checkpoint_round_trip(tiny_flux_dir: Path, tmp_path: Path) -> None:
    """The project's tiny checkpoint (32-wide layers): quanto handles them, NF4 skips them."""
    cache, calls = QuantCache(tmp_path), []
    loader = _loader(tiny_flux_dir, "flux", torch.float32, calls)
    for scheme in ("quanto-int8", "nf4"):  # NF4 converts only ff.net.2 / ff_context.net.2 (128 in)
        fresh = load_quantized(FluxTransformer2DModel, tiny_flux_dir, "transformer",
                               QuantConfig(scheme, torch.float32), cache, loader)
        cached = load_quantized(FluxTransformer2DModel, tiny_flux_dir, "transformer",
                                QuantConfig(scheme, torch.float32), cache, loader)
        assert cached.hit and quantized_module_names(cached.model) == quantized_module_names(fresh.model) != []
        n = fresh.model.config.in_channels
        g = torch.Generator().manual_seed(0)
        kwargs = dict(hidden_states=torch.randn(1, 16, n, generator=g),
                      encoder_hidden_states=torch.randn(1, 8, fresh.model.config.joint_attention_dim, generator=g),
                      pooled_projections=torch.randn(1, fresh.model.config.pooled_projection_dim, generator=g),
                      timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                      img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
        assert_same_weights(cached.model, fresh.model)
        with torch.no_grad():
            ref = loader()(**kwargs)[0]
            _assert_same_model_output(cached.model(**kwargs)[0], fresh.model(**kwargs)[0], ref)
    assert len(calls) == 4  # a quantization per scheme, and a float reference each


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantizing_on_the_gpu_leaves_weights_on_the_host(scheme: str, float_models) -> None:
    """work_device: bitsandbytes arithmetic on CUDA, the quantized state back where the float weights were."""
    model, ref = float_models["flux"]
    q = apply_quantization(copy.deepcopy(model), QuantConfig(scheme, torch.float32), work_device="cuda")
    tensors = [t for _, t in q.named_parameters()] + [getattr(q.get_submodule(n).weight, "SCB", None)
                                                       for n in quantized_module_names(q)]
    assert all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor))
    if scheme == "nf4":
        assert all(q.get_submodule(n).weight.quant_state.absmax.device.type == "cpu"
                   for n in quantized_module_names(q))
    assert _rel(_run("flux", q), ref) < MODEL_BOUND[scheme]["flux"]
