"""Predict GPU and host memory per stage before anything is downloaded.

Why: a 12B-parameter model that does not fit fails minutes into a run with a
deep CUDA trace. The planner builds every model on the `meta` device from the
small configs in `threedis.engine.configs` (or a real config.json), counts the
exact parameters of each layer, prices them in the profile's weight format,
adds per-stage activation estimates, and says which stage would not fit and
which built-in profile would. The counts of the bundled configs are stored
(configs/param_counts.json, checked against a fresh meta count by the tests), so
`threedis plan` imports neither diffusers nor transformers; a plan also says when
it exceeds the profile's VRAM budget or the machine's RAM (`Plan.warnings`).
The constants the runtime acts on (TEXT_BATCH, VAE_TILE_PX) are the runtime's,
read from encoding.py and compute.py; the attention backend is the one
`threedis.kernels.attention.select_backend` picks, as for a render.

Every number below that is not an exact count is a stated approximation:

Weights, bytes per parameter (compute dtype bf16 unless the format is fp16/fp32).
Which modules a format touches follows the runtime (`threedis.engine.quantize.
default_skip_patterns`: FLUX's embedders/proj_out/norm_out, T5's embeddings and
`wo` stay in bf16; fp8 also keeps diffusers' layerwise-casting skips, i.e. every
"norm", which holds FLUX's adaLN Linears, ~27% of its weights):
  bf16/fp16 2, fp32 4 for every parameter.
  fp8 (layerwise casting): Linear/Conv weights and biases 1 B.
  int8 (bitsandbytes LLM.int8): Linear weight 1 B + one fp32 scale per output row.
  nf4 (bitsandbytes, double-quantised statistics): Linear weight 0.5 B + one uint8
      absmax per 64 weights + one fp32 per 256 absmax blocks; only Linears whose
      in_features is a multiple of 64.
  quanto-int8 / quanto-fp8: Linear weight 1 B + one bf16 scale per output row.
  quanto-int4: Linear weight 0.5 B + bf16 scale and shift per group of 128 inputs of a row.
  Quantised formats touch only plain nn.Linear weights; biases, norms, embeddings
  and convolutions stay at 2 B. Buffers count at their own dtype. Checked against
  the runtime's quantised state dicts: exact for fp8, within 4 bytes per layer
  for int8/quanto, nf4 adds NF4_STATE_BYTES per layer.
  Transient: while a cast or quantised layer runs, its bf16 copy exists: the
  largest such layer is added to the stage.

Activations (measured on CPU with real layers, see the constants):
  transformer step: L = H*W/256 + chunk*(N+1) tokens; BLOCK_ACT_MULT x [L, hidden]
      in bf16 (a single-stream block held 15-19x in our measurement: qkv, rotated
      q/k, attention output, 4x MLP and its GELU, the concatenation, residuals),
      plus the attention backend's working memory: sdpa a dense bool mask and a
      bf16 bias (3 L^2 bytes), flex a block mask (O((L/128)^2)), triton O(L).
  text encoders: SDPA attention (the transformers default), per prompt S*(8*d + 3*ff)
      hidden values plus the [heads, S, S] position-bias/mask tensor and one working
      copy; prompts go through in batches of at most TEXT_BATCH (encoding.py's micro-batch:
      one batch of 64 instance prompts would need ~8 GB for T5 alone).
  VAE: VAE_DECODE_ELEMS_PER_PX / VAE_ENCODE_ELEMS_PER_PX values per image pixel;
      tiled runs pay that for one VAE_TILE_PX tile (the runtime's tile size) plus the full image's tiles.
  Small models (UNet, SAM2, depth estimator): measured constants below.
  The VAE, UNet, SAM2 and depth-estimator constants were measured on the real models; a
  narrower checkpoint of the same architecture (the tiny ones) is priced in proportion to
  its width (`_width_ratio`: first block's channels or the backbone's hidden size).
GPU_RESERVE_BYTES is added to every stage that touches the GPU.
Sizes are reported in GB of 2**30 bytes.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from threedis.engine.checks import check_chunk
from threedis.engine.compute import QUANT_COMPUTE_DTYPE_NAME, T5_MAX_LENGTH, TEXT_BATCH, VAE_TILE_PX
from threedis.engine.errors import UserError
from threedis.engine.profiles import (
    GIB, MODEL_KEYS, ModelPolicy, Offload, Placement, Profile, Weights, _suggest, list_profiles,
    load_profile,
)
from threedis.engine.layout import MAX_INSTANCES
from threedis.kernels.backend_order import expected_backend

if TYPE_CHECKING:  # annotations only: torch is imported where a model is built
    import torch

DEFAULT_CONFIGS: Mapping[str, str] = MappingProxyType({
    "transformer": "flux_depth_transformer",
    "t5": "t5_xxl_encoder",
    "clip": "clip_l_text",
    "vae": "flux_vae",
    "ldm3d_unet": "ldm3d_4c_unet",
    "ldm3d_vae": "ldm3d_4c_vae",
    "ldm3d_text": "ldm3d_4c_text",
    "sam2": "sam2_hiera_large",
    "depth_estimator": "depth_anything_v2_large",
})
STAGE2_MODELS: tuple[str, ...] = ("transformer", "t5", "clip", "vae")

# -- stated constants ---------------------------------------------------------------------------
GPU_RESERVE_BYTES = 512 * 1024**2   # CUDA context + cuBLAS workspace + allocator slack
BLOCK_ACT_MULT = 20                 # x [L, hidden] bf16 live inside one FLUX block (measured 15-19)
T5_TOKENS = T5_MAX_LENGTH           # every prompt padded to 512 (SPEC section 2); batches of TEXT_BATCH
CLIP_TOKENS = 77
VAE_DECODE_ELEMS_PER_PX = 1100      # measured 1040 values/pixel (FLUX VAE decoder, 768^2, CPU)
VAE_ENCODE_ELEMS_PER_PX = 700       # measured 645 values/pixel (encoder)
UNET_ELEMS_PER_LATENT_PX = 13000    # SD-1.x UNet, per latent pixel per batch item (measured 12.9k at 64^2)
SAM2_ACT_ELEMS = 150_000_000        # image encoder at 1024^2 + mask decoder (measured 123M values)
DEPTH_ACT_ELEMS = 170_000_000       # DINOv2-L DPT at 518^2 (measured 158M values); scales with aspect
DEPTH_INPUT_PX = 518
NF4_BLOCK = 64                      # bitsandbytes block size; Linears need in_features % 64 == 0
NF4_STATE_BYTES = 1258              # per nf4 layer: 256-entry statistics code, 16-value map, header

_QUANTIZED = {Weights.INT8, Weights.NF4, Weights.QUANTO_INT8, Weights.QUANTO_INT4, Weights.QUANTO_FP8}
_STRIP = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype"}


# -- exact counting on the meta device ----------------------------------------------------------

@dataclass(frozen=True)
class _Leaf:
    """One module's own parameters, with what each weight format would do to them."""

    name: str
    weight: int          # elements of the weight (for non-Linear/Conv modules: all their params)
    bias: int
    rows: int            # output rows of a Linear (one scale each for row-wise formats)
    in_features: int
    fp8_cast: bool       # layerwise casting stores it in fp8
    quantizable: bool    # a plain Linear outside the quantisers' skip patterns
    block: str | None    # repeated block it belongs to (unit of group offload)


@dataclass(frozen=True)
class FormatCost:
    """What one weight format costs one model, in bytes."""

    weight_bytes: int      # every weight, buffer and extra parameter
    outside_blocks: int    # the part outside repeated blocks (group offload keeps it on the GPU)
    largest_block: int
    blocks: int
    transient: int         # bf16 copy of the largest cast/quantised layer while it runs


@dataclass(frozen=True)
class ModelSize:
    """Exact parameter layout of one model, priced per weight format."""

    key: str
    config_name: str
    class_name: str
    params: int                          # exact count from the meta model
    extra_params: int                    # fixed numbers from the config notes (not in the class)
    published_params: int | None
    buffer_bytes: int
    costs: Mapping[str, FormatCost] = field(repr=False)  # Weights value -> cost

    def weight_bytes(self, fmt: Weights) -> int:
        return self.costs[fmt.value].weight_bytes

    def block_split(self, fmt: Weights) -> tuple[int, int, int]:
        """(bytes outside repeated blocks, bytes of the largest block, number of blocks)."""
        cost = self.costs[fmt.value]
        return cost.outside_blocks, cost.largest_block, cost.blocks

    def transient_bytes(self, fmt: Weights) -> int:
        """The bf16 copy of the largest cast/quantised layer while it runs."""
        return self.costs[fmt.value].transient


def _format_cost(leaves: Sequence[_Leaf], buffer_bytes: int, extra_params: int, fmt: Weights) -> FormatCost:
    extra = extra_params * _float_bytes(fmt)
    blocks: dict[str, int] = {}
    outside = buffer_bytes + extra
    for leaf in leaves:
        b = _leaf_bytes(leaf, fmt)
        if leaf.block is None:
            outside += b
        else:
            blocks[leaf.block] = blocks.get(leaf.block, 0) + b
    if fmt is Weights.FP8:
        transient = max((2 * (l.weight + l.bias) for l in leaves if l.fp8_cast), default=0)
    elif fmt in _QUANTIZED:
        transient = max((2 * l.weight for l in leaves if _quantized(l, fmt)), default=0)
    else:
        transient = 0
    return FormatCost(weight_bytes=outside + sum(blocks.values()), outside_blocks=outside,
                      largest_block=max(blocks.values(), default=0), blocks=len(blocks), transient=transient)


def _float_bytes(fmt: Weights) -> int:
    return 4 if fmt is Weights.FP32 else 2


def _leaf_bytes(leaf: _Leaf, fmt: Weights) -> int:
    n, b = leaf.weight, leaf.bias
    if fmt in (Weights.BF16, Weights.FP16, Weights.FP32):
        return _float_bytes(fmt) * (n + b)
    if fmt is Weights.FP8:
        return (1 if leaf.fp8_cast else 2) * (n + b)
    if not _quantized(leaf, fmt):
        return 2 * (n + b)
    if fmt is Weights.INT8:
        return n + 4 * leaf.rows + 2 * b
    if fmt is Weights.NF4:
        return (math.ceil(n / 2) + math.ceil(n / NF4_BLOCK) + 4 * math.ceil(n / (NF4_BLOCK * 256))
                + NF4_STATE_BYTES + 2 * b)
    if fmt in (Weights.QUANTO_INT8, Weights.QUANTO_FP8):
        return n + 2 * leaf.rows + 2 * b
    if fmt is Weights.QUANTO_INT4:
        return math.ceil(n / 2) + 4 * leaf.rows * math.ceil(leaf.in_features / 128) + 2 * b
    raise AssertionError(fmt)


def load_config(name_or_path: str | Path) -> dict[str, Any]:
    """A bundled config by name ("flux_vae") or a config.json path (diffusers or transformers)."""
    text = str(name_or_path)
    resource = importlib.resources.files("threedis.engine").joinpath("configs", f"{text}.json")
    if resource.is_file():
        return json.loads(resource.read_text(encoding="utf-8"))
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        bundled = sorted(p.name[:-5] for p in importlib.resources.files("threedis.engine").joinpath(
            "configs").iterdir() if p.name.endswith(".json"))
        raise UserError(f"model config {text!r} is neither bundled ({', '.join(bundled)}) nor a "
                        f"config.json file{_suggest(text, bundled)}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read model config {path}: {exc}") from None


def _library_and_class(cfg: Mapping[str, Any], where: str) -> tuple[str, str]:
    if "_library" in cfg and "_class_name" in cfg:
        return cfg["_library"], cfg["_class_name"]
    if "_class_name" in cfg:
        return "diffusers", cfg["_class_name"]
    if cfg.get("architectures"):
        return "transformers", cfg["architectures"][0]
    raise UserError(f"model config {where} names no class (_class_name or architectures)")


def instantiate_meta(cfg: Mapping[str, Any], where: str = "config") -> "torch.nn.Module":
    """Build the model with no storage (seconds even for 12B parameters)."""
    return instantiate(cfg, where, "meta")


def instantiate(cfg: Mapping[str, Any], where: str = "config", device: Any = "meta") -> "torch.nn.Module":
    """Build the model from a config on `device`: "meta" gives no storage; a real device, the library's own
    random initialisation there (bench/eval_mig.py --random-real), every buffer computed as the class does."""
    import torch  # heavy: only for a config without stored counts (plan itself answers without torch)

    library, class_name = _library_and_class(cfg, where)
    clean = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _STRIP}
    # diffusers / transformers: seconds to import, and only needed for a config without stored counts
    if library == "diffusers":
        import diffusers
        cls = getattr(diffusers, class_name, None)
    else:
        import transformers
        cls = getattr(transformers, class_name, None)
    if cls is None:
        raise UserError(f"model config {where}: {library} has no class {class_name!r}")
    with torch.device(device):
        if library == "diffusers":
            return cls.from_config(clean)
        return cls(cls.config_class(**clean))


def _block_prefixes(model: "torch.nn.Module") -> list[str]:
    """Children of the outermost ModuleLists: the repeated blocks group offload moves."""
    import torch  # heavy: only with a model built by instantiate_meta

    prefixes: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and not any(name.startswith(p + ".") for p in prefixes):
            prefixes.extend(f"{name}.{i}" if name else str(i) for i in range(len(module)))
    return prefixes


def _skip_patterns(model: "torch.nn.Module", scheme: str) -> tuple[str, ...]:
    """Module-name regexes a format leaves in bf16: the runtime's own rule."""
    from threedis.engine.quantize import default_skip_patterns  # imports torch: only with a built model

    return tuple(default_skip_patterns(model, scheme))


def _matches(patterns: tuple[str, ...], names: list[str]) -> bool:
    return any(re.search(p, n) for p in patterns for n in names)


def _quantized(leaf: _Leaf, fmt: Weights) -> bool:
    return leaf.quantizable and (fmt is not Weights.NF4 or leaf.in_features % NF4_BLOCK == 0)


COUNTS_FILE = "param_counts.json"  # in threedis.engine.configs: the counts of every bundled config
_COUNTS_FORMAT = "threedis.param_counts"


def measure_model(key: str, config: str | Path | None = None) -> ModelSize:
    """Exact per-layer parameter counts of one model from its config.

    A bundled config is read from the stored counts (COUNTS_FILE, checked against a fresh
    meta-device count by the tests), so planning needs neither diffusers nor transformers;
    any other config.json is counted on the meta device.
    """
    config = config if config is not None else DEFAULT_CONFIGS[key]
    stored = _stored_counts().get(str(config))
    if stored is not None and stored["config_sha256"] == _config_digest(str(config)):
        return _size_from_counts(key, str(config), stored)
    return count_on_meta(key, config)


def count_on_meta(key: str, config: str | Path) -> ModelSize:
    """measure_model without the stored counts: builds the model on the meta device (seconds for FLUX)."""
    import torch  # heavy: only for a config without stored counts

    cfg = load_config(config)
    model = instantiate_meta(cfg, str(config))
    blocks = _block_prefixes(model)
    skip_fp8 = _skip_patterns(model, "fp8")
    skip_quant = _skip_patterns(model, "int8")
    cast_types = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                  torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    seen: set[int] = set()
    leaves: list[_Leaf] = []
    for name, module in model.named_modules():
        own = [(pn, p) for pn, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        parts = name.split(".")
        ancestors = [".".join(parts[: i + 1]) for i in range(len(parts))]
        is_linear = type(module) is torch.nn.Linear
        weight = sum(p.numel() for pn, p in own if pn != "bias" or not isinstance(module, cast_types))
        bias = sum(p.numel() for pn, p in own if pn == "bias" and isinstance(module, cast_types))
        block = next((p for p in blocks if name == p or name.startswith(p + ".")), None)
        leaves.append(_Leaf(
            name=name, weight=weight, bias=bias,
            rows=module.out_features if is_linear else 0,
            in_features=module.in_features if is_linear else 0,
            fp8_cast=isinstance(module, cast_types) and not _matches(skip_fp8, ancestors),
            quantizable=is_linear and not _matches(skip_quant, ancestors),
            block=block,
        ))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    extra = int(sum((cfg.get("_extra_params") or {}).values()))
    return ModelSize(
        key=key, config_name=str(config), class_name=type(model).__name__,
        params=sum(l.weight + l.bias for l in leaves), extra_params=extra,
        published_params=cfg.get("_published_params"), buffer_bytes=buffers,
        costs=MappingProxyType({fmt.value: _format_cost(leaves, buffers, extra, fmt) for fmt in Weights}),
    )


def _config_digest(name: str) -> str:
    text = importlib.resources.files("threedis.engine").joinpath("configs", f"{name}.json").read_bytes()
    return hashlib.sha256(text).hexdigest()


def _stored_counts() -> dict[str, Any]:
    """The stored counts by bundled config name ({} when the file is missing or not ours)."""
    resource = importlib.resources.files("threedis.engine").joinpath("configs", COUNTS_FILE)
    if not resource.is_file():
        return {}
    data = json.loads(resource.read_text(encoding="utf-8"))
    return data.get("configs", {}) if data.get("format") == _COUNTS_FORMAT else {}


def _size_from_counts(key: str, config: str, stored: Mapping[str, Any]) -> ModelSize:
    return ModelSize(
        key=key, config_name=config, class_name=stored["class_name"], params=stored["params"],
        extra_params=stored["extra_params"], published_params=stored["published_params"],
        buffer_bytes=stored["buffer_bytes"],
        costs=MappingProxyType({fmt: FormatCost(**cost) for fmt, cost in stored["costs"].items()}),
    )


def counts_record(size: ModelSize, config: str) -> dict[str, Any]:
    """One COUNTS_FILE entry: what _size_from_counts reads back, plus the config's digest."""
    return {"config_sha256": _config_digest(config), "class_name": size.class_name, "params": size.params,
            "extra_params": size.extra_params, "published_params": size.published_params,
            "buffer_bytes": size.buffer_bytes,
            "costs": {fmt: dict(vars(cost)) for fmt, cost in size.costs.items()}}


def write_stored_counts(path: Path) -> Path:
    """Count every bundled config on the meta device and write COUNTS_FILE (after a config,
    library or quantizer-rule change: `python -m threedis.engine.planner engine/configs/param_counts.json`)."""
    configs = {name: counts_record(count_on_meta(key, name), name) for key, name in DEFAULT_CONFIGS.items()}
    data = {"format": _COUNTS_FORMAT, "version": 1,
            "note": "exact parameter counts per weight format of each bundled config (threedis.engine.planner)",
            "configs": configs}
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return Path(path)


def _model_request(models: Mapping[str, str | Path] | Sequence[str] | None) -> dict[str, str | Path]:
    if models is None:
        models = STAGE2_MODELS
    chosen = dict(models) if isinstance(models, Mapping) else {m: DEFAULT_CONFIGS.get(m, "") for m in models}
    for key in chosen:
        if key not in MODEL_KEYS:
            raise UserError(f"unknown model {key!r}{_suggest(key, MODEL_KEYS)}; known: {', '.join(MODEL_KEYS)}")
    missing = [m for m in STAGE2_MODELS if m not in chosen]
    if missing:
        raise UserError(f"a plan needs the rendering models {', '.join(STAGE2_MODELS)}; missing "
                        f"{', '.join(missing)}")
    return chosen


def measure_models(models: Mapping[str, str | Path] | Sequence[str] | None = None) -> dict[str, ModelSize]:
    """ModelSize for each requested model (default: the four rendering models)."""
    return {k: measure_model(k, c) for k, c in _model_request(models).items()}


# -- per-stage plan -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StageRow:
    """Predicted memory while one stage runs (weights held + its activations)."""

    stage: str
    models: tuple[str, ...]
    gpu_bytes: int
    host_bytes: int
    details: str


@dataclass(frozen=True)
class PlanRequest:
    """The render a plan is for; check_fits re-plans it with other profiles."""

    width: int
    height: int
    num_instances: int
    chunk: int
    stage1_size: tuple[int, int]
    models: Mapping[str, str | Path]


@dataclass(frozen=True)
class Plan:
    """Per-stage rows, peaks, and the exact model sizes they were priced from."""

    profile: Profile
    request: PlanRequest
    rows: tuple[StageRow, ...]
    sizes: Mapping[str, ModelSize] = field(repr=False)
    seq_len: int
    attention_backend: str
    attention_reason: str = ""
    machine_ram_bytes: int | None = None   # this machine's RAM (None: not known), for `warnings`

    @property
    def peak_gpu_bytes(self) -> int:
        return max(r.gpu_bytes for r in self.rows)

    @property
    def peak_host_bytes(self) -> int:
        return max(r.host_bytes for r in self.rows)

    @property
    def peak_stage(self) -> str:
        return max(self.rows, key=lambda r: r.gpu_bytes).stage

    @property
    def peak_host_stage(self) -> str:
        return max(self.rows, key=lambda r: r.host_bytes).stage

    @property
    def warnings(self) -> tuple[str, ...]:
        """One line per way this plan will not run as planned: over the profile's VRAM budget, over the RAM."""
        out = []
        budget = int(self.profile.min_vram_gb * GIB)
        if self.profile.uses_gpu and self.peak_gpu_bytes > budget:
            out.append(f"peak GPU {_gb(self.peak_gpu_bytes)} GB at {self.peak_stage} exceeds profile "
                       f"{self.profile.name}'s budget of {_gb(budget)} GB (min_vram_gb): use a profile with more "
                       f"VRAM, lighter weight formats (--set), a smaller image or fewer instances")
        ram = self.machine_ram_bytes
        if ram is not None and self.peak_host_bytes > ram:
            out.append(f"peak host RAM {_gb(self.peak_host_bytes)} GB at {self.peak_host_stage} exceeds this "
                       f"machine's {_gb(ram)} GB of RAM: use a profile that keeps more on the GPU, quantized "
                       f"weights (e.g. --set t5.weights=nf4), a smaller image or fewer instances")
        return tuple(out)

    def row(self, stage: str) -> StageRow:
        for r in self.rows:
            if r.stage == stage:
                return r
        raise KeyError(stage)

    def to_dict(self) -> dict[str, Any]:
        req = self.request
        return {
            "profile": self.profile.name, "profile_origin": self.profile.origin,
            "width": req.width, "height": req.height, "num_instances": req.num_instances,
            "chunk": req.chunk, "stage1_size": list(req.stage1_size), "seq_len": self.seq_len,
            "attention_backend": self.attention_backend, "attention_reason": self.attention_reason,
            "machine_ram_bytes": self.machine_ram_bytes, "warnings": list(self.warnings),
            "stages": [{"stage": r.stage, "models": list(r.models), "gpu_bytes": r.gpu_bytes,
                        "host_bytes": r.host_bytes, "details": r.details} for r in self.rows],
            "peak_gpu_bytes": self.peak_gpu_bytes, "peak_host_bytes": self.peak_host_bytes,
            "peak_stage": self.peak_stage,
            "models": {k: {"config": s.config_name, "class": s.class_name, "params": s.params,
                           "extra_params": s.extra_params,
                           "weights": self.profile.policy(k).weights.value,
                           "weight_bytes": s.weight_bytes(self.profile.policy(k).weights)}
                       for k, s in self.sizes.items()},
        }

    def table(self) -> str:
        req = self.request
        lines = [f"memory plan: profile {self.profile.name}, {req.width}x{req.height}, "
                 f"{req.num_instances} instances, chunk {req.chunk} -> L = {self.seq_len} tokens",
                 f"attention backend {self.attention_backend} ({self.attention_reason})",
                 *([f"profile {self.profile.origin}"] if self.profile.origin.startswith("auto") else []),
                 f"profile {self.profile.name} resolved: vae_tiling {str(self.profile.vae_tiling).lower()}, "
                 f"step_cache {self.profile.step_cache.value}, text_encoder_cache "
                 f"{str(self.profile.text_encoder_cache).lower()} (threedis profiles --show for every key)",
                 f"{'stage':<15} {'runs':<16} {'GPU GB':>7} {'host GB':>8}  details"]
        for r in self.rows:
            lines.append(f"{r.stage:<15} {','.join(r.models):<16} {_gb(r.gpu_bytes):>7} "
                         f"{_gb(r.host_bytes):>8}  {r.details}")
        at = f" at {self.peak_stage}" if self.peak_gpu_bytes else ""
        lines.append(f"peak GPU {_gb(self.peak_gpu_bytes)} GB{at}; peak host {_gb(self.peak_host_bytes)} GB")
        lines.append(f"{'model':<16} {'params (exact)':>15} {'format':<12} {'weights GB':>10}  placement")
        for k, s in self.sizes.items():
            p = self.profile.policy(k)
            extra = f" (+{s.extra_params:,} approx.)" if s.extra_params else ""
            where = p.device.value + (f", offload {p.offload.value}" if p.offload is not Offload.NONE else "")
            lines.append(f"{k:<16} {s.params:>15,} {p.weights.value:<12} "
                         f"{_gb(s.weight_bytes(p.weights)):>10}  {where}{extra}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / GIB:.2f}"


@dataclass
class _Stage:
    """Stage under construction: what runs, its activations and a description."""

    name: str
    models: tuple[str, ...]
    activation_bytes: int
    details: str


def _encoder_act(size_cfg: Mapping[str, Any], tokens: int, prompts: int, dtype_bytes: int) -> int:
    d = size_cfg.get("d_model") or size_cfg.get("hidden_size")
    ff = size_cfg.get("d_ff") or size_cfg.get("intermediate_size")
    heads = size_cfg.get("num_heads") or size_cfg.get("num_attention_heads")
    per_prompt = tokens * (8 * d + 3 * ff) * dtype_bytes + heads * tokens * tokens * 2 * dtype_bytes
    return prompts * per_prompt


# The width each measured activation constant belongs to: (config path, the measured model's value).
_MEASURED_WIDTH: Mapping[str, tuple[tuple[str, ...], int]] = MappingProxyType({
    "vae": (("block_out_channels", "0"), 128), "ldm3d_vae": (("block_out_channels", "0"), 128),
    "ldm3d_unet": (("block_out_channels", "0"), 320),
    "depth_estimator": (("backbone_config", "hidden_size"), 1024),
    "sam2": (("vision_config", "backbone_config", "hidden_size"), 144),
})


def _width_ratio(key: str, cfg: Mapping[str, Any]) -> float:
    """This model's width over the measured one's (1.0 when the config does not say): activations scale with it."""
    path, measured = _MEASURED_WIDTH.get(key, ((), 0))
    value: Any = cfg
    for part in path:
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return 1.0
    return value / measured if path and isinstance(value, (int, float)) and value > 0 else 1.0


def _vae_act(width: int, height: int, elems_per_px: float, dtype_bytes: int, tiling: bool) -> tuple[int, str]:
    if tiling and max(width, height) > VAE_TILE_PX:
        tile = min(width, VAE_TILE_PX) * min(height, VAE_TILE_PX)
        return int(elems_per_px * tile * dtype_bytes) + 3 * 3 * width * height * dtype_bytes, f"tiled {VAE_TILE_PX}px"
    return int(elems_per_px * width * height * dtype_bytes), "untiled"


def _attention_bytes(backend: str, seq: int, heads: int, masked: bool) -> int:
    if backend == "sdpa":
        return 3 * seq * seq if masked else 0
    if backend == "flex":
        return 16 * math.ceil(seq / 128) ** 2 + 9 * seq + 4 * heads * seq
    return 9 * seq + 4 * heads * seq


def _stages(profile: Profile, req: PlanRequest, cfgs: Mapping[str, Mapping[str, Any]],
            backend: str) -> tuple[list[_Stage], int]:
    w, h, n = req.width, req.height, req.num_instances
    act_bytes = {k: _float_bytes(profile.policy(k).weights) for k in cfgs}
    ratio = {k: _width_ratio(k, c) for k, c in cfgs.items()}
    stages: list[_Stage] = []
    if "ldm3d_unet" in cfgs:
        w1, h1 = req.stage1_size
        if "ldm3d_text" in cfgs:
            stages.append(_Stage("ldm3d_text", ("ldm3d_text",), _encoder_act(
                cfgs["ldm3d_text"], CLIP_TOKENS, min(n + 2, TEXT_BATCH), act_bytes["ldm3d_text"]),
                f"{n + 2} prompts x 77"))
        lat = (w1 // 8) * (h1 // 8)
        stages.append(_Stage("ldm3d_denoise", ("ldm3d_unet",),
                             int(UNET_ELEMS_PER_LATENT_PX * ratio["ldm3d_unet"] * lat * 2 * act_bytes["ldm3d_unet"]),
                             f"{w1}x{h1}, CFG batch 2"))
        if "ldm3d_vae" in cfgs:
            a, how = _vae_act(w1, h1, VAE_DECODE_ELEMS_PER_PX * ratio["ldm3d_vae"], act_bytes["ldm3d_vae"],
                              profile.vae_tiling)
            stages.append(_Stage("ldm3d_decode", ("ldm3d_vae",), a, f"{w1}x{h1} {how}"))
    if "depth_estimator" in cfgs:
        aspect = max(w, h) / min(w, h)
        stages.append(_Stage("depth_estimate", ("depth_estimator",),
                             int(DEPTH_ACT_ELEMS * ratio["depth_estimator"] * aspect) * act_bytes["depth_estimator"],
                             f"{DEPTH_INPUT_PX}px short side"))
    if "sam2" in cfgs:
        stages.append(_Stage("sam2_masks", ("sam2",), int(SAM2_ACT_ELEMS * ratio["sam2"]) * act_bytes["sam2"],
                             f"1024^2 input, {n} boxes"))
    stages.append(_Stage("clip_encode", ("clip",),
                         _encoder_act(cfgs["clip"], CLIP_TOKENS, 1, act_bytes["clip"]), "global prompt x 77"))
    stages.append(_Stage("t5_encode", ("t5",),
                         _encoder_act(cfgs["t5"], T5_TOKENS, min(n + 1, TEXT_BATCH), act_bytes["t5"]),
                         f"{n + 1} prompts x {T5_TOKENS}, batches of {TEXT_BATCH}"))
    a, how = _vae_act(w, h, VAE_ENCODE_ELEMS_PER_PX * ratio["vae"], act_bytes["vae"], profile.vae_tiling)
    stages.append(_Stage("vae_encode", ("vae",), a, f"depth {w}x{h} {how}"))
    tcfg = cfgs["transformer"]
    hidden = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    image_tokens = (w // 16) * (h // 16)
    seq = image_tokens + req.chunk * (n + 1)
    text_dim = tcfg["joint_attention_dim"]
    act = (BLOCK_ACT_MULT * seq * hidden * 2
           + _attention_bytes(backend, seq, tcfg["num_attention_heads"], n > 0)
           + req.chunk * (n + 1) * text_dim * 2 + image_tokens * tcfg["in_channels"] * 2 * 3
           + seq * tcfg["attention_head_dim"] * 4 * 2)
    stages.append(_Stage("denoise", ("transformer",), act, f"L={seq}, attention {backend}"))
    a, how = _vae_act(w, h, VAE_DECODE_ELEMS_PER_PX * ratio["vae"], act_bytes["vae"], profile.vae_tiling)
    stages.append(_Stage("vae_decode", ("vae",), a, f"{w}x{h} {how}"))
    return stages, seq


def _footprint(size: ModelSize, policy: ModelPolicy) -> tuple[int, int, int, str]:
    """(GPU bytes resident all run, extra bytes on its run device while its stage runs, host bytes all
    run, note)."""
    fmt = policy.weights
    full = size.weight_bytes(fmt)
    if policy.device is Placement.CPU:
        return 0, 0, full, "on CPU"
    if policy.device is Placement.CPU_THEN_FREED:
        return 0, full, 0, "on CPU, loaded, then freed"
    if policy.device is Placement.GPU_THEN_FREED:
        return 0, full, 0, "loaded, then freed"
    if policy.offload is Offload.NONE:
        return full, 0, 0, "resident"
    if policy.offload is Offload.MODEL:
        return 0, full, full, "model offload"
    outside, largest, count = size.block_split(fmt)
    per_group = min(policy.offload_group_blocks, max(count, 1)) * largest
    copies = 2 if policy.use_streams else 1
    note = f"group offload {policy.offload_group_blocks} blocks x{copies}" + (" pinned" if copies == 2 else "")
    return 0, outside + copies * per_group, full, note


def _resolve_backend(profile: Profile) -> tuple[str, str]:
    """(backend, reason) a render of this profile uses on the device it puts the transformer on, in its
    compute dtype: the order and words of kernels.attention.select_backend (kernels.backend_order), for
    a machine where every backend there works (on CUDA, with triton installed). Without torch."""
    policy = profile.policy("transformer")
    device = "cuda" if policy.device.on_gpu else "cpu"
    plain = {Weights.FP16: "float16", Weights.FP32: "float32", Weights.BF16: "bfloat16"}
    return expected_backend(device, plain.get(policy.weights, QUANT_COMPUTE_DTYPE_NAME),
                            profile.attention_backend.value)


def host_ram_bytes() -> int | None:
    """This machine's physical RAM (None where psutil cannot tell)."""
    try:
        import psutil  # a declared dependency; guarded because planning must not fail without it
    except ImportError:
        return None
    return int(psutil.virtual_memory().total)


def plan(profile: Profile | str, width: int, height: int, num_instances: int, chunk: int = 200,
         models: Mapping[str, str | Path] | Sequence[str] | None = None, *,
         stage1_size: tuple[int, int] = (512, 512),
         sizes: Mapping[str, ModelSize] | None = None,
         machine_ram_bytes: int | None = None) -> Plan:
    """Per-stage GPU and host memory for one render with `profile`.

    machine_ram_bytes: the RAM `Plan.warnings` compares with (default: this machine's).
    """
    prof = load_profile(profile) if isinstance(profile, str) else profile
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise UserError(f"image size {width}x{height} must be positive multiples of 16")
    if not 0 <= num_instances <= MAX_INSTANCES:
        raise UserError(f"num_instances = {num_instances} must be between 0 and {MAX_INSTANCES}")
    chunk = check_chunk(chunk)  # the render's own limit: a plan for a render that would be refused is no plan
    chosen = _model_request(models)
    if sizes is None:
        sizes = {k: measure_model(k, c) for k, c in chosen.items()}
    else:
        sizes = {k: sizes[k] if k in sizes else measure_model(k, c) for k, c in chosen.items()}
    req = PlanRequest(width, height, num_instances, chunk, tuple(stage1_size), MappingProxyType(chosen))
    cfgs = {k: load_config(c) for k, c in chosen.items()}
    backend, reason = _resolve_backend(prof)
    stages, seq = _stages(prof, req, cfgs, backend)
    feet = {k: _footprint(s, prof.policy(k)) for k, s in sizes.items()}
    resident = sum(f[0] for f in feet.values())
    host_weights = sum(f[2] for f in feet.values())
    rows = []
    for st in stages:
        on_gpu = [m for m in st.models if prof.policy(m).device.on_gpu]
        gpu = resident + sum(feet[m][1] for m in on_gpu)
        host = host_weights + sum(feet[m][1] for m in st.models if m not in on_gpu)
        transient = sum(sizes[m].transient_bytes(prof.policy(m).weights) for m in st.models)
        if on_gpu:
            gpu += st.activation_bytes + transient
        else:
            host += st.activation_bytes + transient
        if gpu:
            gpu += GPU_RESERVE_BYTES
        notes = "; ".join(f"{m} {prof.policy(m).weights.value} {feet[m][3]}" for m in st.models)
        rows.append(StageRow(st.name, st.models, gpu, host,
                             f"{st.details}; {notes}; act {_gb(st.activation_bytes)} GB"))
    ram = machine_ram_bytes if machine_ram_bytes is not None else host_ram_bytes()
    return Plan(prof, req, tuple(rows), MappingProxyType(dict(sizes)), seq, backend, reason, ram)


def check_fits(plan_: Plan, available_gpu_bytes: int | None, available_host_bytes: int | None = None) -> None:
    """Raise UserError naming the stage that would not fit and what to change (a profile that fits).

    available_gpu_bytes None: a CPU engine (no GPU check; every model runs from host RAM).
    """
    gpu_bad = [r for r in plan_.rows if available_gpu_bytes is not None and r.gpu_bytes > available_gpu_bytes]
    host_bad = [r for r in plan_.rows if available_host_bytes is not None and r.host_bytes > available_host_bytes]
    if not gpu_bad and not host_bad:
        return
    req = plan_.request
    if available_gpu_bytes is None:
        worst = max(host_bad, key=lambda r: r.host_bytes)
        raise UserError(f"this CPU render needs {_gb(worst.host_bytes)} GB of RAM at stage {worst.stage!r} "
                        f"({req.width}x{req.height}, {req.num_instances} instances) but {_gb(available_host_bytes)} "
                        f"GB is available: use a smaller image or fewer instances, free some RAM, or render on a GPU")
    fitting: list[Plan] = []
    for name in list_profiles():
        other = plan(load_profile(name), req.width, req.height, req.num_instances, req.chunk, req.models,
                     stage1_size=req.stage1_size, sizes=plan_.sizes)
        host_ok = available_host_bytes is None or other.peak_host_bytes <= available_host_bytes
        if other.peak_gpu_bytes <= available_gpu_bytes and host_ok and name != plan_.profile.name:
            fitting.append(other)
    if gpu_bad:
        worst = max(gpu_bad, key=lambda r: r.gpu_bytes)
        msg = (f"profile {plan_.profile.name!r} needs {_gb(worst.gpu_bytes)} GB of GPU memory at stage "
               f"{worst.stage!r} ({req.width}x{req.height}, {req.num_instances} instances) but "
               f"{_gb(available_gpu_bytes)} GB is available")
    else:
        worst = max(host_bad, key=lambda r: r.host_bytes)
        msg = (f"profile {plan_.profile.name!r} needs {_gb(worst.host_bytes)} GB of host RAM at stage "
               f"{worst.stage!r} but {_gb(available_host_bytes or 0)} GB is available")
    gpu_fits = [p for p in fitting if p.profile.uses_gpu]
    if gpu_fits:
        best = max(gpu_fits, key=lambda p: p.profile.min_vram_gb)
        msg += (f"; use --profile {best.profile.name} (predicted peak {_gb(best.peak_gpu_bytes)} GB GPU, "
                f"{_gb(best.peak_host_bytes)} GB host)")
    elif fitting:
        msg += f"; no GPU profile fits: use --profile {fitting[0].profile.name} or a smaller image"
    else:
        msg += "; no built-in profile fits: use a smaller image or fewer instances"
    if worst.stage in ("vae_decode", "vae_encode", "ldm3d_decode") and not plan_.profile.vae_tiling:
        msg += ", or set vae_tiling=true"
    raise UserError(msg)


# Auxiliary model key -> (AuxModels kind, config subfolder inside that model's folder).
AUX_FOLDERS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "ldm3d_unet": ("stage1", "unet"), "ldm3d_vae": ("stage1", "vae"), "ldm3d_text": ("stage1", "text_encoder"),
    "sam2": ("sam", ""), "depth_estimator": ("depth", ""),
})


def aux_configs(keys: Iterable[str], folders: Mapping[str, str]) -> dict[str, str | Path]:
    """Config per auxiliary model: the config.json inside its local folder when there is one (a tiny
    or custom model is priced as it is), else the bundled config of the real model (a hub id).

    folders: AuxModels kind ("stage1", "sam", "depth") -> local folder or hub id.
    """
    out: dict[str, str | Path] = {}
    for key in keys:
        kind, sub = AUX_FOLDERS[key]
        where = folders.get(kind)
        path = Path(where).expanduser() / sub / "config.json" if where else None
        out[key] = path if path is not None and path.is_file() else DEFAULT_CONFIGS[key]
    return out


def models_for(stage1: bool = False, sam2: bool = False, depth_estimator: bool = False) -> tuple[str, ...]:
    """Model keys for a run: the rendering models plus the optional ones."""
    extra: Iterable[str] = ()
    if stage1:
        extra = (*extra, "ldm3d_unet", "ldm3d_vae", "ldm3d_text")
    if sam2:
        extra = (*extra, "sam2")
    if depth_estimator:
        extra = (*extra, "depth_estimator")
    return (*STAGE2_MODELS, *extra)


if __name__ == "__main__":  # regenerate the stored counts
    print(f"wrote {write_stored_counts(Path(sys.argv[1]))}")
