"""Stage-1 weights: the release's key rule, strict errors, safe loading, safetensors conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from threedis.engine.errors import UserError
from threedis.engine.stage1.checkpoint import (
    convert_to_safetensors,
    load_adapter_weights,
    load_state_file,
    load_unet_weights,
    read_pickle_state,
    resolve_weight_file,
)

# The release's layers and naming rule, written out by hand (from the authors' checkpoint
# layout): `<layer>.attn2.processor.migc.<sub key>`, C = width of the layer, D = text width.
LAYERS = ["mid_block.attentions.0.transformer_blocks.0",
          *(f"up_blocks.1.attentions.{i}.transformer_blocks.0" for i in range(3)),
          *(f"up_blocks.2.attentions.{i}.transformer_blocks.0" for i in range(3))]


def released_sub_keys(c: int, d: int) -> dict[str, tuple[int, ...]]:
    return {
        "migc.gamma": (1,),
        "migc.ea.to_q.weight": (c, c), "migc.ea.to_k.weight": (c, d), "migc.ea.to_v.weight": (c, d),
        "migc.ea.to_out.0.weight": (c, c), "migc.ea.to_out.0.bias": (c,),
        "migc.la.to_q.weight": (c, c), "migc.la.to_k.weight": (c, c), "migc.la.to_v.weight": (c, c),
        "migc.la.to_out.0.weight": (c, c), "migc.la.to_out.0.bias": (c,),
        "migc.norm.weight": (c,), "migc.norm.bias": (c,),
        "migc.sac.conv2.weight": (1, c, 1, 1), "migc.sac.conv2.bias": (1,),
        "migc.sac.cbam2.ChannelGate.mlp.1.weight": (30, 30), "migc.sac.cbam2.ChannelGate.mlp.1.bias": (30,),
        "migc.sac.cbam2.ChannelGate.mlp.3.weight": (30, 30), "migc.sac.cbam2.ChannelGate.mlp.3.bias": (30,),
        "migc.sac.cbam2.SpatialGate.spatial.conv.weight": (1, 2, 7, 7),
        "migc.pos_net.linears_position.0.weight": (512, 64), "migc.pos_net.linears_position.0.bias": (512,),
        "migc.pos_net.linears_position.2.weight": (512, 512), "migc.pos_net.linears_position.2.bias": (512,),
        "migc.pos_net.linears_position.4.weight": (d, 512), "migc.pos_net.linears_position.4.bias": (d,),
    }


def released_state(widths: dict[str, int], d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{layer}.attn2.processor.{k}": torch.randn(shape, generator=g)
            for layer in LAYERS for k, shape in released_sub_keys(widths[layer], d).items()}


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    from threedis.engine.tiny.ldm3d import TINY_LDM3D

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_LDM3D["unet"]).eval()


def _widths(unet) -> dict[str, int]:
    return {layer: unet.get_submodule(f"{layer}.attn2").to_q.in_features for layer in LAYERS}


def _fresh_procs(unet):
    import copy

    from threedis.engine.stage1.processors import install_processors, make_adapters

    unet = copy.deepcopy(unet)
    return unet, install_processors(unet, make_adapters(unet))


def test_adapter_loads_released_naming_strictly(tiny_unet):
    unet, procs = _fresh_procs(tiny_unet)
    assert sorted(procs) == sorted(LAYERS)
    widths = _widths(unet)
    assert widths[LAYERS[0]] == 64 and widths[LAYERS[-1]] == 32
    state = released_state(widths, unet.config.cross_attention_dim)
    load_adapter_weights(procs, {"state_dict": state}["state_dict"], "test")
    for layer, proc in procs.items():
        for k, v in proc.state_dict().items():
            assert torch.equal(v, state[f"{layer}.attn2.processor.{k}"])
    # and the processors are part of the UNet's own state dict under the same names
    assert set(state) <= set(unet.state_dict())


def test_adapter_key_errors_name_the_keys(tiny_unet):
    unet, procs = _fresh_procs(tiny_unet)
    state = released_state(_widths(unet), unet.config.cross_attention_dim)
    broken = dict(state)
    gone = f"{LAYERS[2]}.attn2.processor.migc.la.to_k.weight"
    del broken[gone]
    broken["up_blocks.3.attentions.0.transformer_blocks.0.attn2.processor.migc.gamma"] = torch.zeros(1)
    for i in range(7):
        broken[f"extra.{i}"] = torch.zeros(1)
    wrong = f"{LAYERS[0]}.attn2.processor.migc.norm.bias"
    broken[wrong] = torch.zeros(3)
    with pytest.raises(UserError) as info:
        load_adapter_weights(procs, broken, "layout_adapter.ckpt")
    msg = str(info.value)
    assert "layout_adapter.ckpt" in msg and gone in msg and wrong in msg and "(3,)" in msg
    assert "unexpected keys" in msg and "(8 in all)" in msg  # first few named, then the count


def test_unet_weights_strict(tiny_unet):
    import copy

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    state = {k: v.clone() + 1 for k, v in tiny_unet.state_dict().items()}
    with init_empty_weights():
        empty = UNet2DConditionModel.from_config(tiny_unet.config)
    load_unet_weights(empty, state, "unet_0901.ckpt")
    assert all(torch.equal(v, state[k]) for k, v in empty.state_dict().items())
    bad = dict(state)
    bad.pop("conv_in.weight")
    bad["conv_in.weight_typo"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing keys: conv_in.weight.*unexpected keys: conv_in.weight_typo"):
        load_unet_weights(copy.deepcopy(tiny_unet), bad, "unet_0901.ckpt")


def test_convert_round_trip_and_sibling_preferred(tmp_path: Path):
    state = {"a.weight": torch.randn(3, 4), "b": torch.arange(5), "view": torch.randn(10)[2:6]}
    ckpt = tmp_path / "w.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, ckpt)
    out = convert_to_safetensors(ckpt)
    assert out == tmp_path / "w.safetensors"
    back = load_state_file(out)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    # once the sibling exists it is what loads, even when the .ckpt is asked for
    from safetensors.torch import save_file

    save_file({"only": torch.zeros(1)}, out)
    assert list(load_state_file(ckpt)) == ["only"]
    assert set(read_pickle_state(ckpt)) == set(state)


class _Sneaky:
    def __reduce__(self):
        return (Path.touch, (Path(_Sneaky.target),))


def test_weights_only_refuses_arbitrary_objects(tmp_path: Path):
    _Sneaky.target = str(tmp_path / "pwned")
    evil = tmp_path / "evil.ckpt"
    torch.save({"w": torch.zeros(2), "obj": _Sneaky()}, evil)
    with pytest.raises(UserError, match="refusing to load"):
        load_state_file(evil)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(UserError, match="refusing to load"):
        convert_to_safetensors(evil)


def test_non_tensor_entries_and_missing_files(tmp_path: Path):
    f = tmp_path / "mixed.ckpt"
    torch.save({"w": torch.zeros(1), "step": 3}, f)
    with pytest.raises(UserError, match="not a plain state dict"):
        load_state_file(f)
    with pytest.raises(UserError, match="not found"):
        load_state_file(tmp_path / "nope.ckpt")


def test_offline_hub_says_where_to_put_the_file(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="download layout_adapter.ckpt"):
        resolve_weight_file("someone/not-cached", "layout_adapter.ckpt", local_files_only=True)
    (tmp_path / "x.ckpt").touch()
    assert resolve_weight_file(tmp_path, "x.ckpt") == tmp_path / "x.ckpt"
    assert resolve_weight_file(tmp_path / "x.ckpt", "ignored.ckpt") == tmp_path / "x.ckpt"
    with pytest.raises(UserError, match="has no missing.ckpt"):
        resolve_weight_file(tmp_path, "missing.ckpt")


def test_convert_weights_command_once(tmp_path: Path, capsys):
    from threedis.engine.cli import main

    unet, adapter = {"w": torch.randn(2, 3)}, {"a.attn2.processor.migc.gamma": torch.ones(1)}
    torch.save(unet, tmp_path / "unet_0901.ckpt")
    torch.save({"state_dict": adapter}, tmp_path / "layout_adapter.ckpt")
    assert main(["convert-weights", str(tmp_path)]) == 0
    for name, state in (("unet_0901", unet), ("layout_adapter", adapter)):
        back = load_state_file(tmp_path / f"{name}.ckpt")  # the copy is what loads now
        assert (tmp_path / f"{name}.safetensors").is_file()
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    stamp = (tmp_path / "unet_0901.safetensors").stat().st_mtime_ns
    assert main(["convert-weights", str(tmp_path / "unet_0901.ckpt")]) == 0
    assert (tmp_path / "unet_0901.safetensors").stat().st_mtime_ns == stamp  # kept: one-time
    assert "exists, kept" in capsys.readouterr().out
    assert main(["convert-weights", str(tmp_path / "nothing")]) == 2
    assert main(["convert-weights", str(tmp_path / "unet_0901.safetensors")]) == 2


def test_files_that_are_not_checkpoints_get_one_line(tmp_path: Path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, not weights\n")
    with pytest.raises(UserError, match=r"notes.ckpt is not a torch checkpoint \(neither a zip nor a pickle file\)"):
        read_pickle_state(text)
    broken = tmp_path / "broken.ckpt"
    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.arange(4.0)}, good)
    broken.write_bytes(good.read_bytes()[:30])  # a zip cut short
    with pytest.raises(UserError, match="cannot read .*broken.ckpt as a torch checkpoint"):
        read_pickle_state(broken)


def test_legacy_pickle_format_still_loads(tmp_path: Path):
    old = tmp_path / "old.ckpt"
    torch.save({"w": torch.arange(3.0)}, old, _use_new_zipfile_serialization=False)
    assert torch.equal(read_pickle_state(old)["w"], torch.arange(3.0))
