"""Planner: exact counts against real models and published sizes, stage rows, fit checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from threedis.engine import planner as P
from threedis.engine.errors import UserError
from threedis.engine.profiles import GIB, Weights, list_profiles, load_profile
from threedis.engine.api import RenderOptions

ALL_MODELS = P.models_for(stage1=True, sam2=True, depth_estimator=True)


@pytest.fixture(scope="module")
def sizes():
    return P.measure_models(ALL_MODELS)


# -- real configs against published totals -------------------------------------------------------

@pytest.mark.parametrize("key, published", [
    ("transformer", 11.9e9), ("t5", 4.76e9), ("clip", 123e6), ("vae", 83.8e6),
    ("ldm3d_unet", 859.52e6), ("ldm3d_vae", 83.65e6), ("ldm3d_text", 123e6),
])
def test_real_configs_match_published_totals(sizes, key, published):
    assert sizes[key].params == pytest.approx(published, rel=5e-3)


def test_flux_depth_is_flux_dev_plus_depth_channels(sizes):
    # FLUX.1-dev has 11,901,408,320 parameters; Depth doubles x_embedder's 64 input channels.
    assert sizes["transformer"].params == 11_901_408_320 + 64 * 3072


@pytest.mark.parametrize("key, cls_name, exact", [
    ("transformer", "FluxTransformer2DModel", 11_901_604_928), ("t5", "T5EncoderModel", 4_762_310_656),
    ("clip", "CLIPTextModel", 123_060_480), ("vae", "AutoencoderKL", 83_819_683),
])
def test_real_configs_count_like_numel_on_meta(sizes, key, cls_name, exact):
    """The planner's per-layer count equals the library's own numel over the shipped config's meta model."""
    import diffusers
    import transformers

    cfg = {k: v for k, v in P.load_config(P.DEFAULT_CONFIGS[key]).items()
           if not k.startswith("_") and k not in ("architectures", "model_type", "transformers_version",
                                                   "torch_dtype", "dtype")}
    with torch.device("meta"):
        if hasattr(diffusers, cls_name):
            model = getattr(diffusers, cls_name).from_config(cfg)
        else:
            cls = getattr(transformers, cls_name)
            model = cls(cls.config_class(**cfg))
    assert type(model).__name__ == sizes[key].class_name
    assert sum(p.numel() for p in model.parameters()) == sizes[key].params == exact


@pytest.mark.parametrize("config, published", [
    ("depth_anything_v2_small", 24.8e6), ("depth_anything_v2_large", 335.3e6),
])
def test_depth_anything_sizes(config, published):
    assert P.measure_model("depth_estimator", config).params == pytest.approx(published, rel=5e-3)


def test_sam2_settings_reproduce_published_video_model():
    # 224.4M is published for the video model; build the same settings as Sam2VideoModel.
    from transformers import Sam2VideoConfig, Sam2VideoModel

    cfg = P.load_config("sam2_hiera_large")
    with torch.device("meta"):
        video = Sam2VideoModel(Sam2VideoConfig(vision_config=cfg["vision_config"]))
    assert sum(p.numel() for p in video.parameters()) == pytest.approx(224.4e6, rel=5e-3)


def test_extra_params_are_added_to_weights(sizes):
    unet = sizes["ldm3d_unet"]
    assert unet.extra_params == 62_000_000
    assert unet.weight_bytes(Weights.FP16) == 2 * (unet.params + unet.extra_params) + unet.buffer_bytes


# -- meta counts against real tiny models --------------------------------------------------------

TINY = {
    "flux": {"_library": "diffusers", "_class_name": "FluxTransformer2DModel", "in_channels": 16,
             "out_channels": 8, "num_layers": 2, "num_single_layers": 3, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 24, "pooled_projection_dim": 12,
             "guidance_embeds": True, "axes_dims_rope": [4, 6, 6], "patch_size": 1},
    "t5": {"_library": "transformers", "_class_name": "T5EncoderModel", "d_model": 32, "d_ff": 40,
           "d_kv": 8, "num_heads": 4, "num_layers": 3, "vocab_size": 101, "feed_forward_proj": "gated-gelu",
           "relative_attention_num_buckets": 8, "tie_word_embeddings": False},
    "clip": {"_library": "transformers", "_class_name": "CLIPTextModel", "hidden_size": 24,
             "intermediate_size": 36, "num_hidden_layers": 2, "num_attention_heads": 3, "vocab_size": 99,
             "max_position_embeddings": 77, "projection_dim": 16},
    "vae": {"_library": "diffusers", "_class_name": "AutoencoderKL", "block_out_channels": [8, 16],
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "latent_channels": 4, "in_channels": 3, "out_channels": 3, "norm_num_groups": 4,
            "layers_per_block": 1, "use_quant_conv": False, "use_post_quant_conv": False},
    "unet": {"_library": "diffusers", "_class_name": "UNet2DConditionModel", "block_out_channels": [8, 16],
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 12,
             "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 2, "sample_size": 8},
    "depth": {"_library": "transformers", "_class_name": "DepthAnythingForDepthEstimation",
              "backbone_config": {"model_type": "dinov2", "hidden_size": 16, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                                  "out_indices": [1, 2], "out_features": ["stage1", "stage2"],
                                  "reshape_hidden_states": False},
              "neck_hidden_sizes": [8, 16], "reassemble_factors": [2, 1], "fusion_hidden_size": 8,
              "head_hidden_size": 4, "reassemble_hidden_size": 16, "patch_size": 14},
}


def _real(cfg):
    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    torch.manual_seed(0)
    if cfg["_library"] == "diffusers":
        import diffusers
        return getattr(diffusers, cfg["_class_name"]).from_config(clean)
    import transformers
    cls = getattr(transformers, cfg["_class_name"])
    return cls(cls.config_class(**clean))


def _tiny(tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(TINY[name]), encoding="utf-8")
    return path


def _param_bytes(model):
    # parameters() already skips shared tensors (T5's tied embedding)
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("name", list(TINY))
def test_meta_count_equals_real_model(tmp_path, name):
    size = P.measure_model("transformer", _tiny(tmp_path, name))
    real = _real(TINY[name])
    assert size.params == sum(p.numel() for p in real.parameters())
    buffers = sum(b.numel() * b.element_size() for b in real.buffers())
    assert size.buffer_bytes == buffers
    assert size.weight_bytes(Weights.FP32) == _param_bytes(real) + buffers
    real_bf16 = _real(TINY[name]).to(torch.bfloat16)
    bf16_buffers = sum(b.numel() * b.element_size() for b in real_bf16.buffers())
    # float buffers follow .to(); the planner keeps buffers at their built dtype, so compare params only
    assert size.weight_bytes(Weights.BF16) - size.buffer_bytes == _param_bytes(real_bf16)
    assert bf16_buffers <= buffers


QUANT_TINY = {
    # widths that are multiples of 64 (nf4 blocks) and 128 (quanto int4 groups), plus T5 heads
    # of 3 x 16 so its attention output projection (in_features 48) is left out by nf4 only
    "flux": {"_library": "diffusers", "_class_name": "FluxTransformer2DModel", "in_channels": 64,
             "out_channels": 32, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 64,
             "num_attention_heads": 2, "joint_attention_dim": 128, "pooled_projection_dim": 64,
             "guidance_embeds": True, "axes_dims_rope": [16, 24, 24], "patch_size": 1},
    "t5": {"_library": "transformers", "_class_name": "T5EncoderModel", "d_model": 128, "d_ff": 192,
           "d_kv": 16, "num_heads": 3, "num_layers": 2, "vocab_size": 101, "feed_forward_proj": "gated-gelu",
           "relative_attention_num_buckets": 8, "tie_word_embeddings": False},
}


def _state_bytes(model):
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:   # T5's tied embedding appears twice
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("name", list(QUANT_TINY))
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8", "nf4", "quanto-int8", "quanto-int4", "quanto-fp8"])
def test_format_bytes_match_the_runtime_quantizer(tmp_path, name, fmt):
    quantize = pytest.importorskip("threedis.engine.quantize")
    if fmt in ("int8", "nf4"):
        pytest.importorskip("bitsandbytes")
    if fmt.startswith("quanto"):
        pytest.importorskip("optimum.quanto")
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(QUANT_TINY[name]), encoding="utf-8")
    size = P.measure_model("transformer", path)
    model = quantize.apply_quantization(_real(QUANT_TINY[name]), fmt)
    layers = sum(1 for n, m in model.named_modules() if n in quantize.quantized_module_names(model))
    actual = _state_bytes(model)
    predicted = size.weight_bytes(Weights(fmt))
    print(f"{name} {fmt}: predicted {predicted} B, runtime state {actual} B, {layers} quantised layers")
    assert abs(actual - predicted) <= 8 * layers


def test_int8_and_nf4_brute_force_keep_t5_wo(tmp_path):
    # independent of the runtime: bnb stores int8 + an fp32 scale per row; nf4 packs two
    # weights a byte with a uint8 absmax per 64 (fp32 per 256 of those); T5's `wo` stays bf16
    path = tmp_path / "t5.json"
    path.write_text(json.dumps(QUANT_TINY["t5"]), encoding="utf-8")
    size = P.measure_model("t5", path)
    real = _real(QUANT_TINY["t5"])
    seen, expect8, expect4 = set(), 0, 0
    for name, module in real.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            linear = type(module) is torch.nn.Linear and pname == "weight" and not name.endswith(".wo")
            expect8 += n + 4 * module.out_features if linear else 2 * n
            if linear and module.in_features % 64 == 0:
                expect4 += n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + P.NF4_STATE_BYTES
            else:
                expect4 += 2 * n
    assert size.weight_bytes(Weights.INT8) == expect8 + size.buffer_bytes
    assert size.weight_bytes(Weights.NF4) == expect4 + size.buffer_bytes


def test_weight_formats_order_for_real_transformer(sizes):
    t = sizes["transformer"]
    b = {f: t.weight_bytes(f) for f in Weights}
    assert b[Weights.FP32] == 2 * b[Weights.BF16]
    assert b[Weights.NF4] < b[Weights.INT8] < b[Weights.FP8] < b[Weights.BF16]
    assert b[Weights.BF16] == pytest.approx(23.8e9, rel=5e-3)


def test_block_split_covers_all_weights(sizes):
    t = sizes["transformer"]
    outside, largest, count = t.block_split(Weights.BF16)
    assert count == 19 + 38
    assert outside + largest <= t.weight_bytes(Weights.BF16) <= outside + count * largest


# -- plans --------------------------------------------------------------------------------------

STAGES = ["ldm3d_text", "ldm3d_denoise", "ldm3d_decode", "depth_estimate", "sam2_masks",
          "clip_encode", "t5_encode", "vae_encode", "denoise", "vae_decode"]


def test_table_has_every_stage_and_model(sizes):
    plan = P.plan("12gb", 1024, 1024, 4, models=ALL_MODELS, sizes=sizes)
    text = plan.table()
    assert [r.stage for r in plan.rows] == STAGES
    for stage in STAGES:
        assert stage in text
    for key in ALL_MODELS:
        assert key in text
    assert "11,901,604,928" in text
    assert plan.seq_len == 4096 + 200 * 5
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["peak_gpu_bytes"] == max(s["gpu_bytes"] for s in d["stages"])
    assert d["models"]["t5"]["params"] == sizes["t5"].params


def test_default_plan_has_render_stages_only(sizes):
    plan = P.plan("24gb", 512, 512, 0, sizes=sizes)
    assert [r.stage for r in plan.rows] == ["clip_encode", "t5_encode", "vae_encode", "denoise", "vae_decode"]


@pytest.mark.parametrize("name", ["8gb", "12gb", "16gb", "24gb"])
def test_builtin_profiles_fit_what_they_are_designed_for(sizes, name):
    profile = load_profile(name)
    plan = P.plan(profile, 1024, 1024, 4, models=ALL_MODELS, sizes=sizes)
    assert plan.peak_gpu_bytes <= profile.min_vram_gb * GIB, plan.table()
    P.check_fits(plan, int(profile.min_vram_gb * GIB))


def test_cpu_profile_uses_no_gpu(sizes):
    plan = P.plan("cpu", 1024, 1024, 4, sizes=sizes)
    assert plan.peak_gpu_bytes == 0
    assert plan.peak_host_bytes > sizes["transformer"].weight_bytes(Weights.BF16)


def test_memory_grows_with_size_and_instances(sizes):
    def denoise(w, h, n, **ov):
        return P.plan(load_profile("16gb", ov), w, h, n, sizes=sizes).row("denoise").gpu_bytes
    assert denoise(1024, 1024, 0) < denoise(1024, 1024, 4) < denoise(1024, 1024, 9) < denoise(2048, 2048, 9)
    seq = 4096 + 200 * 10
    dense = denoise(1024, 1024, 9, attention_backend="sdpa")
    assert dense - denoise(1024, 1024, 9, attention_backend="triton") >= seq * seq  # >= 1 byte per mask entry


def test_offload_modes_trade_gpu_for_host(sizes):
    def rows(**ov):
        return P.plan(load_profile("24gb", ov), 1024, 1024, 2, sizes=sizes).row("denoise")
    resident = rows()
    model = rows(**{"transformer.offload": "model"})
    group = rows(**{"transformer.offload": "group", "transformer.offload_group_blocks": "2"})
    streams = rows(**{"transformer.offload": "group", "transformer.offload_group_blocks": "2",
                      "transformer.use_streams": "true"})
    weights = sizes["transformer"].weight_bytes(Weights.FP8)
    assert resident.gpu_bytes == model.gpu_bytes
    assert model.host_bytes - resident.host_bytes == weights
    assert group.gpu_bytes < streams.gpu_bytes < model.gpu_bytes
    assert group.host_bytes == model.host_bytes
    # the resident transformer weighs on every stage; an offloaded one does not
    assert P.plan("24gb", 1024, 1024, 2, sizes=sizes).row("clip_encode").gpu_bytes > weights


def test_vae_tiling_lowers_large_decodes(sizes):
    tiled = P.plan(load_profile("24gb", {"vae_tiling": "true"}), 2048, 2048, 0, sizes=sizes)
    untiled = P.plan(load_profile("24gb", {"vae_tiling": "false"}), 2048, 2048, 0, sizes=sizes)
    assert tiled.row("vae_decode").gpu_bytes < untiled.row("vae_decode").gpu_bytes


def test_check_fits_names_stage_and_suggests_profile(sizes):
    plan = P.plan("24gb", 1024, 1024, 4, sizes=sizes)
    with pytest.raises(UserError) as info:
        P.check_fits(plan, 9 * GIB)
    msg = str(info.value)
    assert f"stage '{plan.peak_stage}'" in msg and "9.00 GB is available" in msg
    assert f"{plan.peak_gpu_bytes / GIB:.2f} GB" in msg
    suggested = msg.split("--profile ")[1].split()[0]
    assert suggested in list_profiles() and suggested != "cpu"
    assert P.plan(suggested, 1024, 1024, 4, sizes=sizes).peak_gpu_bytes <= 9 * GIB
    # and it is the largest that fits
    for name in list_profiles():
        if load_profile(name).min_vram_gb > load_profile(suggested).min_vram_gb:
            assert P.plan(name, 1024, 1024, 4, sizes=sizes).peak_gpu_bytes > 9 * GIB


def test_check_fits_falls_back_to_cpu_and_hints_tiling(sizes):
    with pytest.raises(UserError, match="--profile cpu"):
        P.check_fits(P.plan("8gb", 1024, 1024, 4, sizes=sizes), GIB)
    plan = P.plan("24gb", 2048, 2048, 0, sizes=sizes)
    assert plan.peak_stage == "vae_decode"
    with pytest.raises(UserError, match="vae_tiling=true"):
        P.check_fits(plan, plan.peak_gpu_bytes - 1)


def test_check_fits_host_ram(sizes):
    plan = P.plan("cpu", 1024, 1024, 0, sizes=sizes)
    P.check_fits(plan, 0)
    with pytest.raises(UserError, match="host RAM"):
        P.check_fits(plan, 0, available_host_bytes=8 * GIB)


@pytest.mark.parametrize("kwargs, match", [
    ({"width": 1000}, "multiples of 16"),
    ({"num_instances": -1}, "num_instances"),
    ({"chunk": 0}, "chunk"),
    ({"models": ["transformer", "t5", "clip", "vae", "sam"]}, "did you mean 'sam2'"),
    ({"models": ["transformer", "t5"]}, "missing clip, vae"),
])
def test_plan_input_errors(sizes, kwargs, match):
    args = {"width": 1024, "height": 1024, "num_instances": 2, **kwargs}
    with pytest.raises(UserError, match=match):
        P.plan("12gb", sizes=sizes, **args)


def test_unknown_config_is_a_user_error():
    with pytest.raises(UserError, match="did you mean 'flux_vae'"):
        P.load_config("flux_vea")


def test_plan_command_table_json_and_errors(tmp_path, capsys):
    """`threedis plan layout.json --profile 12gb [--json]`: the table, exact counts, a bad key named."""
    from threedis.engine.cli import main
    from threedis.engine.layout import Instance, Layout

    path = tmp_path / "layout.json"
    Layout("a room", 1024, 1024, tuple(Instance(f"thing {i}", (0.1 * i, 0.1, 0.1 * i + 0.2, 0.5))
                                       for i in range(4))).save(path)
    assert main(["plan", str(path), "--profile", "12gb"]) == 0
    table = capsys.readouterr().out
    assert "profile 12gb, 1024x1024, 4 instances" in table and "L = 5096 tokens" in table  # 4096 + 200 * 5
    assert "11,901,604,928" in table and "denoise" in table
    assert main(["plan", str(path), "--profile", "12gb", "--json", "--set", "t5.weights=nf4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["models"]["t5"]["params"] == 4_762_310_656 and data["models"]["t5"]["weights"] == "nf4"
    assert data["seq_len"] == 5096 and {s["stage"] for s in data["stages"]} >= {"t5_encode", "denoise"}
    assert main(["plan", str(path), "--profile", "12gb", "--set", "vae.tiling=false"]) != 0
    assert "vae.tiling" in capsys.readouterr().err


def test_plan_command_adds_stage1_sam_and_depth_rows(tmp_path, capsys):
    from threedis.engine.cli import main
    from threedis.engine.layout import Instance, Layout

    path = tmp_path / "layout.json"
    Layout("a room", 512, 512, (Instance("a lamp", (0.1, 0.1, 0.4, 0.6)),)).save(path)
    assert main(["plan", str(path), "--profile", "12gb", "--json"]) == 0
    plain = {s["stage"] for s in json.loads(capsys.readouterr().out)["stages"]}
    assert main(["plan", str(path), "--profile", "12gb", "--json", "--stage1", "--sam", "--depth-from-photo",
                 "--stage1-size", "256"]) == 0
    data = json.loads(capsys.readouterr().out)
    stages = {s["stage"] for s in data["stages"]}
    assert stages - plain == {"ldm3d_text", "ldm3d_denoise", "ldm3d_decode", "sam2_masks", "depth_estimate"}
    assert data["models"]["ldm3d_vae"]["params"] == P.measure_model("ldm3d_vae").params
    with pytest.raises(SystemExit) as bad_size:  # argparse reads --stage1-size as render does (sizes.parse_size)
        main(["plan", str(path), "--stage1", "--stage1-size", "100"])
    assert bad_size.value.code != 0
    assert "--stage1-size" in capsys.readouterr().err


def test_engine_memory_check_prices_the_auxiliary_models(tiny_flux_dir, tmp_path):
    """The pre-render check counts stage 1 and SAM2 when a render runs them (bundled real configs)."""
    from threedis.engine.runtime import ModelManager

    manager = ModelManager(load_profile("12gb"), "cpu", tiny_flux_dir, tmp_path)
    base = manager.plan(512, 512, 2, 16)
    more = manager.plan(512, 512, 2, 16, extra=("ldm3d_unet", "ldm3d_vae", "ldm3d_text", "sam2"))
    assert [r.stage for r in more.rows if r.stage not in {r.stage for r in base.rows}] == [
        "ldm3d_text", "ldm3d_denoise", "ldm3d_decode", "sam2_masks"]
    unet = next(r for r in more.rows if r.stage == "ldm3d_denoise")
    with pytest.raises(UserError, match="ldm3d_denoise"):
        manager.check_fits(512, 512, 2, 16, available_gpu_bytes=unet.gpu_bytes - 1,
                           extra=("ldm3d_unet", "ldm3d_vae", "ldm3d_text"))


# -- warnings, backend, CPU RAM check ----------------------------------------------------------

def test_plan_warns_over_the_profile_budget_and_the_machine_ram(sizes):
    heavy = load_profile("12gb", {"transformer.weights": "fp8"})
    over = P.plan(heavy, 512, 512, 2, sizes=sizes, machine_ram_bytes=1 << 50)
    assert over.peak_gpu_bytes > 10.5 * GIB
    (line,) = over.warnings
    assert "exceeds profile 12gb's budget of 10.50 GB" in line and f"{over.peak_gpu_bytes / GIB:.2f} GB" in line
    assert P.plan("12gb", 512, 512, 2, sizes=sizes, machine_ram_bytes=1 << 50).warnings == ()
    cpu = P.plan("cpu", 512, 512, 2, sizes=sizes, machine_ram_bytes=24 * GIB)
    (line,) = cpu.warnings
    assert "exceeds this machine's 24.00 GB of RAM" in line and cpu.peak_host_bytes > 24 * GIB
    data = cpu.to_dict()
    assert data["warnings"] == [line] and data["machine_ram_bytes"] == 24 * GIB
    assert f"warning: {line}" in cpu.table()


def test_plan_names_the_backend_renders_use(sizes):
    """The plan (which imports no torch) names what select_backend picks for a render of the profile."""
    from threedis.kernels.attention import select_backend

    cpu = P.plan("cpu", 512, 512, 2, sizes=sizes)
    assert (cpu.attention_backend, cpu.attention_reason) == select_backend("cpu", torch.bfloat16)
    assert cpu.attention_backend == "sdpa" and "attention backend sdpa (auto on cpu" in cpu.table()
    gpu = P.plan("12gb", 512, 512, 2, sizes=sizes)
    assert gpu.attention_backend == "triton"  # a CUDA render with triton installed
    if torch.cuda.is_available():  # the machine can say what it picks: the same
        assert (gpu.attention_backend, gpu.attention_reason) == select_backend("cuda", torch.bfloat16)
    named = P.plan(load_profile("12gb", {"attention_backend": "sdpa"}), 512, 512, 2, sizes=sizes)
    assert named.attention_backend == "sdpa"


def test_plan_command_prints_the_warning_and_the_json_field(tmp_path, capsys):
    """A plan that does not fit is printed whole and exits 3 (2 stays for usage errors): scripts can tell."""
    from threedis.engine.cli import EXIT_PLAN_DOES_NOT_FIT, main

    path = tmp_path / "layout.json"
    path.write_text('{"prompt": "a room", "width": 512, "height": 512}')
    assert EXIT_PLAN_DOES_NOT_FIT == 3
    assert main(["plan", str(path), "--profile", "12gb", "--set", "transformer.weights=fp8"]) == 3
    assert "warning: peak GPU" in capsys.readouterr().out
    assert main(["plan", str(path), "--profile", "12gb", "--set", "transformer.weights=fp8", "--json"]) == 3
    assert "budget" in json.loads(capsys.readouterr().out)["warnings"][0]
    assert main(["plan", str(path), "--profile", "24gb"]) == 0  # fits: exit 0
    capsys.readouterr()


def test_plan_command_over_this_machines_ram_exits_3(tmp_path, capsys, monkeypatch):
    from threedis.engine.cli import main

    path = tmp_path / "layout.json"
    path.write_text('{"prompt": "a room", "width": 512, "height": 512}')
    monkeypatch.setattr(P, "host_ram_bytes", lambda: 2 * P.GIB)
    assert main(["plan", str(path), "--profile", "cpu"]) == 3
    assert "exceeds this machine's 2.00 GB of RAM" in capsys.readouterr().out
    monkeypatch.setattr(P, "host_ram_bytes", lambda: 1024 * P.GIB)
    assert main(["plan", str(path), "--profile", "cpu"]) == 0


def test_plan_command_defaults_to_the_profile_a_render_picks_and_reads_renders_flags(tmp_path, capsys, monkeypatch):
    """`plan` speaks render's language: --profile auto by default, --stage1 / --sam with or without a model."""
    from threedis.engine.cli import main
    from threedis.engine.profiles import resolve_profile

    monkeypatch.setattr(P, "host_ram_bytes", lambda: 1024 * P.GIB)
    path = tmp_path / "layout.json"
    path.write_text('{"prompt": "a room", "width": 512, "height": 512, '
                    '"instances": [{"prompt": "a lamp", "box": [0.1, 0.1, 0.4, 0.6]}]}')
    assert main(["plan", str(path), "--json"]) in (0, 3)
    data = json.loads(capsys.readouterr().out)
    assert data["profile"] == resolve_profile("auto").name and data["profile_origin"].startswith("auto: ")
    assert main(["plan", str(path), "--json", "--profile", "12gb", "--stage1", "auto", "--sam",
                 "facebook/sam2.1-hiera-large", "--depth-from-photo", str(tmp_path / "photo.jpg")]) == 0
    stages = {s["stage"] for s in json.loads(capsys.readouterr().out)["stages"]}
    assert {"ldm3d_denoise", "sam2_masks", "depth_estimate"} <= stages


def test_cpu_engine_checks_host_ram_before_a_render(tiny_flux_dir, tmp_path):
    from threedis.engine.runtime import ModelManager

    manager = ModelManager(load_profile("cpu"), "cpu", tiny_flux_dir, tmp_path)
    need = manager.plan(64, 64, 2, 16).peak_host_bytes
    manager.check_fits(64, 64, 2, 16, available_host_bytes=need)
    with pytest.raises(UserError, match=r"this CPU render needs .* GB of RAM at stage .* smaller image"):
        manager.check_fits(64, 64, 2, 16, available_host_bytes=need - 1)
    manager.check_fits(64, 64, 2, 16)  # measured: the tiny models fit any machine


def test_render_on_cpu_refuses_a_plan_over_the_ram(tiny_flux_dir, tmp_path, monkeypatch, depth_image_64):
    from threedis.engine import runtime
    from threedis.engine.api import Engine
    from threedis.engine.layout import Instance, Layout

    engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", cache_dir=tmp_path)
    monkeypatch.setattr(runtime, "_available_ram", lambda: 1 << 20)  # a 1 MB machine
    layout = Layout("a room", 64, 64, (Instance("a lamp", (0.1, 0.1, 0.5, 0.5)),))
    with pytest.raises(UserError, match="of RAM at stage"):
        engine.render(layout, depth=depth_image_64, steps=1, options=RenderOptions(chunk=8))
    assert engine.models.placement()["transformer"]["loads"] == 0  # refused before anything loaded


def test_aux_configs_prefer_the_local_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    configs = P.aux_configs(["ldm3d_unet", "ldm3d_vae", "sam2"], {"stage1": str(tmp_path), "sam": "facebook/x"})
    assert configs == {"ldm3d_unet": tmp_path / "unet" / "config.json", "ldm3d_vae": "ldm3d_4c_vae",
                       "sam2": "sam2_hiera_large"}
