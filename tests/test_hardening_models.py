"""Broken model folders: each kind of damage ends in one UserError naming the component and the file.

Each test copies a tiny checkpoint (written by the project's own writers) to a temp
folder, breaks one thing the way a bad download, a hand edit or a mix-up would, and
checks the one line the user gets. Tests run as root here, where chmod does not stop
reads, so an unreadable file is simulated by making `open` refuse that one path.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from threedis.engine import loading
from threedis.engine.api import Engine
from threedis.engine.errors import UserError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(file: Path, **changes) -> None:
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    print(message)
    assert "\n" not in message
    return message


@pytest.fixture
def flux(tiny_flux_dir: Path, tmp_path: Path) -> Path:
    return _copy(tiny_flux_dir, tmp_path / "m")


def _refuse_open(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """`open(path)` raises PermissionError as for a file without read permission (root ignores chmod)."""
    real = builtins.open
    target = str(path)

    def fake_open(file, *args, **kwargs):
        if str(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # pathlib opens through io.open


# ------------------------------------------------------------------ config files


def test_non_json_config(flux: Path) -> None:
    (flux / "transformer" / "config.json").write_text('{"in_channels": 128,')
    with pytest.raises(UserError) as err:
        Engine.from_pretrained(flux, device="cpu", cache_dir=flux.parent / "c")
    assert _one_line(err).startswith(f"transformer: {flux / 'transformer' / 'config.json'}: not valid JSON")


def test_config_that_is_not_an_object(flux: Path) -> None:
    (flux / "vae" / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(UserError) as err:
        loading.check_checkpoint(flux)
    assert _one_line(err) == f"vae: {flux / 'vae' / 'config.json'}: holds a JSON list, not an object of settings"


@pytest.mark.parametrize("part, file, change, expected", [
    ("transformer", "config.json", {"in_channels": "lots"}, "in_channels must be a positive integer, got 'lots'"),
    ("transformer", "config.json", {"guidance_embeds": "yes"}, "guidance_embeds must be true or false, got 'yes'"),
    ("transformer", "config.json", {"num_layers": 10**9},
     "num_layers must be at most 304 (16x the real model's 19), got 1000000000"),
    ("transformer", "config.json", {"axes_dims_rope": [4, "six", 6]},
     "axes_dims_rope entries must be a positive integer, got 'six'"),
    ("vae", "config.json", {"block_out_channels": []}, "block_out_channels must not be empty"),
    ("vae", "config.json", {"scaling_factor": float("nan")}, "scaling_factor must be a finite number, got nan"),
    ("scheduler", "scheduler_config.json", {"num_train_timesteps": 0},
     "num_train_timesteps must be a positive integer, got 0"),
    ("scheduler", "scheduler_config.json", {"shift": -1.0}, "shift must be positive, got -1.0"),
    ("text_encoder_2", "config.json", {"num_heads": 2.5}, "num_heads must be a positive integer, got 2.5"),
    ("text_encoder", "config.json", {"eos_token_id": -1}, "eos_token_id must be a whole number >= 0, got -1"),
])
def test_bad_config_value_names_part_file_and_key(flux: Path, part: str, file: str, change: dict,
                                                  expected: str) -> None:
    _edit(flux / part / file, **change)
    with pytest.raises(UserError) as err:
        loading.check_checkpoint(flux)
    assert _one_line(err) == f"{part}: {flux / part / file}: {expected}"


def test_doubled_text_width_is_a_mismatch_with_t5(flux: Path) -> None:
    _edit(flux / "transformer" / "config.json", joint_attention_dim=64)  # T5's d_model is 32
    with pytest.raises(UserError) as err:
        Engine.from_pretrained(flux, device="cpu", cache_dir=flux.parent / "c")
    assert _one_line(err).startswith(f"transformer: {flux / 'transformer' / 'config.json'}: joint_attention_dim "
                                     f"is 64 but must be text_encoder_2's d_model (32)")


def test_latent_channels_must_fit_the_transformer(flux: Path) -> None:
    _edit(flux / "vae" / "config.json", latent_channels=8)
    with pytest.raises(UserError, match=r"^transformer: .*in_channels is 128 but must be 8 x vae's "
                                        r"latent_channels \(8\)"):
        loading.check_checkpoint(flux)


def test_flux_without_depth_control_is_named(flux: Path) -> None:
    _edit(flux / "transformer" / "config.json", in_channels=64)  # FLUX.1-dev's: no control latents
    with pytest.raises(UserError, match=r"^transformer: .*in_channels is 64, a FLUX model without depth control; "
                                        r"give FLUX.1-Depth-dev"):
        loading.check_checkpoint(flux)


def test_absurd_layer_count_is_refused_before_anything_is_built(flux: Path, monkeypatch) -> None:
    from diffusers import FluxTransformer2DModel

    _edit(flux / "transformer" / "config.json", num_layers=10**9)
    monkeypatch.setattr(FluxTransformer2DModel, "__init__", lambda *a, **k: pytest.fail("model built"))
    with pytest.raises(UserError, match=r"^transformer: .*num_layers must be at most 304"):
        loading.load_transformer(flux, torch.float32)


def test_swapped_text_encoders(flux: Path) -> None:
    (flux / "text_encoder").rename(flux / "swap")
    (flux / "text_encoder_2").rename(flux / "text_encoder")
    (flux / "swap").rename(flux / "text_encoder_2")
    with pytest.raises(UserError) as err:
        loading.check_checkpoint(flux)
    assert _one_line(err).startswith(f"text_encoder: {flux / 'text_encoder' / 'config.json'}: holds a 't5' model, "
                                     f"expected CLIPTextModel")


def test_swapped_vae_and_transformer_configs(flux: Path) -> None:
    vae, transformer = flux / "vae" / "config.json", flux / "transformer" / "config.json"
    a, b = vae.read_text(), transformer.read_text()
    vae.write_text(b)
    transformer.write_text(a)
    with pytest.raises(UserError, match=r"^transformer: .*holds a AutoencoderKL, expected a FluxTransformer2DModel"):
        loading.check_checkpoint(flux)


# ------------------------------------------------------------------ tokenizers, weights, permissions


def test_broken_tokenizer_json(flux: Path) -> None:
    file = flux / "tokenizer_2" / "tokenizer.json"
    file.write_bytes(file.read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(UserError) as err:
        loading.check_checkpoint(flux)
    assert _one_line(err).startswith(f"tokenizer_2: {file}: not valid JSON")


def test_broken_sentencepiece_model(flux: Path) -> None:
    (flux / "tokenizer_2" / "tokenizer.json").unlink()
    (flux / "tokenizer_2" / "spiece.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError) as err:
        loading.load_t5_tokenizer(flux)
    assert _one_line(err).startswith(f"tokenizer_2: {flux / 'tokenizer_2'}")


def test_weights_of_another_part(flux: Path) -> None:
    name = "diffusion_pytorch_model.safetensors"
    shutil.copy(flux / "vae" / name, flux / "transformer" / name)
    with pytest.raises(UserError) as err:
        loading.load_transformer(flux, torch.float32)
    assert _one_line(err).startswith(f"transformer: {flux / 'transformer'}: the weights do not fit its config.json")


def test_unreadable_config_says_permission_not_download(flux: Path, monkeypatch) -> None:
    file = flux / "vae" / "config.json"
    _refuse_open(monkeypatch, file)
    with pytest.raises(UserError) as err:
        loading.check_checkpoint(flux)
    message = _one_line(err)
    assert message.startswith(f"vae: {file}: permission denied") and "download" not in message


def test_unreadable_weights_say_permission_not_download(flux: Path, monkeypatch) -> None:
    file = flux / "transformer" / "diffusion_pytorch_model.safetensors"
    _refuse_open(monkeypatch, file)
    with pytest.raises(UserError) as err:
        Engine.from_pretrained(flux, device="cpu", cache_dir=flux.parent / "c")
    message = _one_line(err)
    assert message.startswith(f"transformer: {file}: permission denied") and "download" not in message


def test_quantized_load_checks_the_config_first(flux: Path, tmp_path: Path) -> None:
    pytest.importorskip("optimum.quanto")
    from diffusers import FluxTransformer2DModel

    from threedis.engine.quant_cache import QuantCache, load_quantized

    _edit(flux / "transformer" / "config.json", num_single_layers=10**9)
    with pytest.raises(UserError, match=r"^transformer: .*num_single_layers must be at most 608"):
        load_quantized(FluxTransformer2DModel, flux, "transformer", "quanto-int8", QuantCache(tmp_path / "q"),
                       lambda: pytest.fail("source loaded"))
    (flux / "transformer" / "config.json").write_text("{")
    with pytest.raises(UserError, match=r"^transformer: .*config.json: not valid JSON"):
        load_quantized(FluxTransformer2DModel, flux, "transformer", "quanto-int8", QuantCache(tmp_path / "q"),
                       lambda: pytest.fail("source loaded"))


# ------------------------------------------------------------------ stage 1, SAM2, Depth Anything


@pytest.fixture(scope="module")
def ldm3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from threedis.engine.tiny.ldm3d import write_tiny_ldm3d

    return write_tiny_ldm3d(tmp_path_factory.mktemp("ldm3d"))


def _stage1(base: Path):
    from threedis.engine.stage1 import Stage1Pipeline

    return Stage1Pipeline.from_pretrained(base, device="cpu", local_files_only=True)


def test_stage1_bad_unet_config(ldm3d: Path, tmp_path: Path) -> None:
    base = _copy(ldm3d, tmp_path / "s1")
    _edit(base / "unet" / "config.json", in_channels="lots")
    with pytest.raises(UserError) as err:
        _stage1(base)
    assert _one_line(err) == (f"stage 1 unet: {base / 'unet' / 'config.json'}: in_channels must be a positive "
                              f"integer, got 'lots'")


def test_stage1_unet_and_text_encoder_must_fit(ldm3d: Path, tmp_path: Path) -> None:
    base = _copy(ldm3d, tmp_path / "s1")
    width = json.loads((base / "text_encoder" / "config.json").read_text())["hidden_size"]
    _edit(base / "unet" / "config.json", cross_attention_dim=2 * width)
    with pytest.raises(UserError, match=rf"^stage 1 unet: .*cross_attention_dim is {2 * width} but must be "
                                        rf"text_encoder's hidden_size \({width}\)"):
        _stage1(base)


def test_stage1_scheduler_and_broken_tokenizer(ldm3d: Path, tmp_path: Path) -> None:
    base = _copy(ldm3d, tmp_path / "s1")
    _edit(base / "scheduler" / "scheduler_config.json", num_train_timesteps=0)
    with pytest.raises(UserError, match=r"^stage 1 scheduler: .*num_train_timesteps must be a positive integer"):
        _stage1(base)
    shutil.copy(ldm3d / "scheduler" / "scheduler_config.json", base / "scheduler" / "scheduler_config.json")
    (base / "tokenizer" / "vocab.json").write_text("not json")
    with pytest.raises(UserError) as err:
        _stage1(base)
    assert _one_line(err).startswith(f"stage 1 tokenizer: {base / 'tokenizer'}: cannot be loaded (")


def test_stage1_adapter_file_of_another_model(ldm3d: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    base = _copy(ldm3d, tmp_path / "s1")
    (base / "layout_adapter.ckpt").unlink()
    save_file({"x": torch.zeros(2)}, base / "layout_adapter.safetensors")
    with pytest.raises(UserError) as err:
        _stage1(base)
    assert "layout adapter weights" in _one_line(err)


def test_convert_weights_on_a_text_file(tmp_path: Path, capsys) -> None:
    from threedis.engine.cli import main

    (tmp_path / "notes.txt").write_text("not weights\n")
    assert main(["convert-weights", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("threedis: error: ") and "is not a torch checkpoint" in err and "\n" not in err


def test_sam2_non_json_config(tmp_path: Path) -> None:
    from threedis.engine.sam_masks import SamMasker
    from threedis.engine.tiny.sam2 import write_tiny_sam2

    folder = write_tiny_sam2(tmp_path / "sam")
    (folder / "config.json").write_text("<html>rate limited</html>")
    with pytest.raises(UserError) as err:
        SamMasker.from_pretrained(folder, device="cpu")
    assert _one_line(err).startswith(f"SAM2 model: {folder / 'config.json'}: not valid JSON")


def test_sam2_unreadable_preprocessor_config(tmp_path: Path, monkeypatch) -> None:
    from threedis.engine.sam_masks import SamMasker
    from threedis.engine.tiny.sam2 import write_tiny_sam2

    folder = write_tiny_sam2(tmp_path / "sam")
    file = folder / "preprocessor_config.json"
    monkeypatch.setattr(Path, "read_text", _refusing_read_text(file, Path.read_text))
    with pytest.raises(UserError) as err:
        SamMasker.from_pretrained(folder, device="cpu")
    message = _one_line(err)
    assert message.startswith(f"SAM2 model: {file}: permission denied") and "download" not in message


def _refusing_read_text(target: Path, real):
    def read_text(self, *args, **kwargs):
        if self == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(target))
        return real(self, *args, **kwargs)
    return read_text


def test_depth_model_bad_config(tmp_path: Path) -> None:
    from threedis.engine.depth_estimation import DepthEstimator
    from threedis.engine.tiny.depth import write_tiny_depth_anything

    folder = write_tiny_depth_anything(tmp_path / "da")
    _edit(folder / "config.json", neck_hidden_sizes=[])
    with pytest.raises(UserError) as err:
        DepthEstimator.from_pretrained(folder, device="cpu")
    assert _one_line(err) == f"depth model: {folder / 'config.json'}: neck_hidden_sizes must not be empty"
    _edit(folder / "config.json", neck_hidden_sizes=[8, 16, 32, 64], model_type="sam2")
    with pytest.raises(UserError, match=r"^depth model: .*holds a 'sam2' model"):
        DepthEstimator.from_pretrained(folder, device="cpu")


def test_shipped_real_configs_pass_their_own_checks() -> None:
    """The references are the real models' configs: a real download must never be refused."""
    from threedis.engine.config_check import check_config, reference_config

    for ref in ("flux_depth_transformer", "flux_vae", "clip_l_text", "t5_xxl_encoder", "ldm3d_4c_unet",
                "ldm3d_4c_vae", "ldm3d_4c_text", "sam2_hiera_large", "depth_anything_v2_large", "flux_scheduler"):
        config = {k: v for k, v in reference_config(ref).items() if not k.startswith("_")}
        check_config("x", Path("config.json"), config, ref)
    small = reference_config("depth_anything_v2_small")
    check_config("x", Path("config.json"), small, "depth_anything_v2_large")
