"""Every key a profile accepts is acted on by the model manager, or refused by validation.

On a CPU machine the manager's actions are observed through its placement records,
its on_load/on_free hooks, the device a loader is asked for, and (for moves between
host and GPU) a recording mover on a "meta" engine device that never copies data.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from threedis.engine import runtime
from threedis.engine.errors import UserError
from threedis.engine.offload import move_parts
from threedis.engine.profiles import MODEL_KEYS, SUPPORT, Placement, Weights, load_profile
from threedis.engine.runtime import AUX_SLOTS, RUNTIME_MODELS, SLOTS, ModelManager
from threedis.engine.stages import PROFILE_KEYS, AuxModels

AUX_KIND = {"stage1": "stage1", "sam2": "sam", "depth_estimator": "depth"}
FLOATS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Wrapper:
    """Stands for SamMasker / DepthEstimator / Stage1Pipeline: modules plus the device inputs go to."""

    def __init__(self, device: torch.device) -> None:
        self.net = nn.Linear(2, 2)
        self.device = device


def slot_overrides(slot: str, **fields: str) -> dict[str, str]:
    """The same fields for every profile entry of a slot (stage 1's three parts move together)."""
    return {f"{key}.{field}": value for key in SLOTS[slot] for field, value in fields.items()}


def aux_with(slot: str, engine_device: str = "cpu", **fields: str) -> tuple[AuxModels, list]:
    profile = load_profile("cpu", slot_overrides(slot, **fields))
    manager = ModelManager(profile, engine_device, None)
    aux = AuxModels(stage1="somewhere", models=manager)
    asked: list = []
    kind = AUX_KIND[slot]
    aux.loaders[kind] = lambda spec: asked.append(aux.placement(SLOTS[slot][0])) or Wrapper(asked[-1][0])
    return aux, asked


# -- weights ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", MODEL_KEYS)
@pytest.mark.parametrize("weights", sorted(FLOATS))
def test_float_weights_reach_every_model(key, weights):
    profile = load_profile("cpu", {f"{key}.weights": weights})
    manager = ModelManager(profile, "cpu", None)
    assert manager.placement()[key]["weights"] == weights
    if key in RUNTIME_MODELS:
        assert manager.compute_dtype(key) == FLOATS[weights]  # the dtype the loader is called with
    else:
        assert AuxModels(models=manager).placement(key) == (torch.device("cpu"), FLOATS[weights])


@pytest.mark.parametrize("key", [k for k in MODEL_KEYS if SUPPORT[k].weights != tuple(Weights)])
@pytest.mark.parametrize("weights", ["fp8", "int8", "nf4", "quanto-int8", "quanto-int4", "quanto-fp8"])
def test_quantized_weights_are_refused_for_the_auxiliary_models(key, weights):
    overrides = {f"{key}.weights": weights, f"{key}.device": "gpu-then-freed"}
    with pytest.raises(UserError) as info:
        load_profile("12gb", overrides)
    msg = str(info.value)
    assert f"{key}.weights = '{weights}' is not supported for {key}" in msg and "fp16, bf16, fp32" in msg, msg


# -- device: the four placements, for every slot ---------------------------------------------------

EXPECTED_AFTER = {  # device -> (state after a stage, freed?)
    "gpu": ("resident", False), "cpu": ("resident", False),
    "gpu-then-freed": ("freed", True), "cpu-then-freed": ("freed", True),
}


@pytest.mark.parametrize("device", [p.value for p in Placement])
@pytest.mark.parametrize("slot", AUX_SLOTS)
def test_auxiliary_models_follow_their_device(slot, device):
    aux, asked = aux_with(slot, device=device)
    refs: list = []
    frees: list = []
    aux.models.on_free(slot, lambda: frees.append(slot))
    kind = AUX_KIND[slot]
    seen = aux.run(kind, lambda m: (refs.append(weakref.ref(m)), aux.models.placement()[SLOTS[slot][0]]["state"]))
    gc.collect()
    state, freed = EXPECTED_AFTER[device]
    assert seen[1] == "in stage"
    for key in SLOTS[slot]:
        assert aux.models.placement()[key]["state"] == state
        assert aux.models.placement()[key]["device"] == device
    assert (refs[0]() is None) == freed and (frees == [slot]) == freed
    assert (aux.live == {}) == freed
    aux.run(kind, lambda m: None)
    assert len(asked) == (2 if freed else 1)  # a kept model is not loaded again
    assert asked[0][0] == torch.device("cpu")


@pytest.mark.parametrize("device", [p.value for p in Placement])
@pytest.mark.parametrize("key", RUNTIME_MODELS)
def test_rendering_models_follow_their_device(tiny_flux_dir, tmp_path, key, device):
    profile = load_profile("cpu", {f"{key}.device": device})
    manager = ModelManager(profile, "cpu", tiny_flux_dir, tmp_path)
    refs: list = []
    manager.on_load(key, lambda m: refs.append(weakref.ref(m)))
    with manager.use(key) as model:
        assert manager.placement()[key]["state"] == "in stage" and model is not None
        del model
    gc.collect()
    state, freed = EXPECTED_AFTER[device]
    record = manager.placement()[key]
    assert record["state"] == state and record["device"] == device
    assert (refs[0]() is None) == freed
    assert record["run"] == "cpu"  # a "gpu" placement runs on the engine's device, here the CPU


def test_gpu_placements_use_the_engine_device_and_cpu_ones_never_do():
    profile = load_profile("cpu", {"sam2.device": "gpu", "depth_estimator.device": "cpu-then-freed",
                                   **slot_overrides("stage1", device="gpu-then-freed")})
    manager = ModelManager(profile, "meta", None)  # any device other than the CPU shows the difference
    assert manager.run_device("sam2") == manager.load_device("sam2") == torch.device("meta")
    assert manager.run_device("stage1") == manager.load_device("stage1") == torch.device("meta")
    assert manager.run_device("depth_estimator") == manager.load_device("depth_estimator") == torch.device("cpu")


# -- offload --------------------------------------------------------------------------------------

def recording_mover(monkeypatch) -> list:
    moves: list = []

    def move(model, device):
        moves.append(torch.device(device).type)
        model.device = torch.device(device)
        return model

    monkeypatch.setattr(runtime, "move_parts", move)
    monkeypatch.setattr(runtime, "move_model", move)
    return moves


@pytest.mark.parametrize("slot", AUX_SLOTS)
def test_model_offload_parks_an_auxiliary_model_in_host_ram(slot, monkeypatch):
    moves = recording_mover(monkeypatch)
    aux, asked = aux_with(slot, engine_device="meta", device="gpu", offload="model")
    kind = AUX_KIND[slot]
    inside = aux.run(kind, lambda m: m.device.type)
    assert asked[0][0] == torch.device("cpu")  # loaded into its home, host RAM
    assert inside == "meta" and moves == ["meta", "cpu"]  # on the run device only for its stage
    record = aux.models.placement()[SLOTS[slot][0]]
    assert record["state"] == "parked" and record["home"] == "cpu" and record["run"] == "meta"
    aux.run(kind, lambda m: None)
    assert len(asked) == 1 and moves == ["meta", "cpu", "meta", "cpu"]


def test_no_offload_keeps_a_gpu_model_where_it_runs(monkeypatch):
    moves = recording_mover(monkeypatch)
    aux, asked = aux_with("sam2", engine_device="meta", device="gpu")
    aux.run("sam", lambda m: None)
    assert asked[0][0] == torch.device("meta") and moves == []
    assert aux.models.placement()["sam2"]["state"] == "resident"


@pytest.mark.parametrize("key", RUNTIME_MODELS)
def test_model_offload_of_a_rendering_model(tiny_flux_dir, tmp_path, key):
    manager = ModelManager(load_profile("cpu", {f"{key}.device": "gpu", f"{key}.offload": "model"}), "cpu",
                           tiny_flux_dir, tmp_path)
    with manager.use(key):
        pass
    record = manager.placement()[key]
    assert record["state"] == "parked" and record["home"] == "cpu" and record["offload"] == "model"


def test_group_offload_streams_the_transformer_with_its_settings(tiny_flux_dir, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(runtime, "apply_group_offload", lambda model, run, blocks, streams: calls.append(
        (run.type, blocks, streams)))
    profile = load_profile("16gb", {"transformer.weights": "bf16", "transformer.offload_group_blocks": "3"})
    manager = ModelManager(profile, "cuda", tiny_flux_dir, tmp_path)  # placement only: nothing runs on CUDA
    manager.get("transformer")
    assert calls == [("cuda", 3, True)]
    assert manager.placement()["transformer"]["state"] == "streamed"


@pytest.mark.parametrize("key", [k for k in MODEL_KEYS if k != "transformer"])
def test_group_offload_and_its_settings_are_refused_elsewhere(key):
    gpu = {f"{k}.device": "gpu" for k in SLOTS.get(key, ()) or (key,)}
    with pytest.raises(UserError, match=rf"{key}\.offload = 'group' is not supported for {key}.*none, model"):
        load_profile("12gb", {**gpu, f"{key}.device": "gpu", f"{key}.offload": "group"})
    with pytest.raises(UserError, match=rf"{key}\.offload_group_blocks = 2 is not used.*leave .* at 1"):
        load_profile("12gb", {f"{key}.offload_group_blocks": "2"})
    with pytest.raises(UserError, match=rf"{key}\.use_streams = true is not used.*leave .* at false"):
        load_profile("12gb", {f"{key}.use_streams": "true"})


@pytest.mark.parametrize("device", ["gpu-then-freed", "cpu-then-freed", "cpu"])
def test_offload_of_a_model_that_is_not_kept_on_the_gpu_is_refused(device):
    with pytest.raises(UserError, match=r"sam2\.(offload|device)"):
        load_profile("12gb", {"sam2.device": device, "sam2.offload": "model"})


# -- stage 1 is one pipeline ----------------------------------------------------------------------

@pytest.mark.parametrize("part", ["ldm3d_vae", "ldm3d_text"])
@pytest.mark.parametrize("field, value", [("device", "cpu-then-freed"), ("offload", "model")])
def test_stage1_parts_must_share_the_unet_placement(part, field, value):
    overrides = {f"{part}.{field}": value}
    if field == "offload":
        overrides[f"{part}.device"] = "gpu"
    with pytest.raises(UserError, match=rf"{part}\.\w+ = .* differs from ldm3d_unet\.\w+ = .*same"):
        load_profile("12gb", overrides)
    # all three together are fine, and the slot follows them
    together = slot_overrides("stage1", **{field: value, **({"device": "gpu"} if field == "offload" else {})})
    profile = load_profile("12gb", together)
    assert {profile.policy(k).to_dict()[field] for k in PROFILE_KEYS["stage1"]} == {value}


# -- the top-level keys that change what runs -------------------------------------------------------

@pytest.mark.parametrize("on", [True, False])
def test_text_encoder_cache_turns_the_prompt_cache_on_and_off(tiny_flux_dir, tmp_path, on):
    from threedis.engine.api import Engine

    engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path,
                                    overrides={"text_encoder_cache": str(on).lower()})
    assert (engine.prompts.cache is not None) == on


def test_move_parts_moves_a_wrappers_modules_and_its_input_device():
    wrapper = Wrapper(torch.device("cpu"))
    moved = move_parts(wrapper, "meta")
    assert moved is wrapper and wrapper.device == torch.device("meta")
    assert all(p.device.type == "meta" for p in wrapper.net.parameters())
    module = nn.Linear(2, 2)
    assert move_parts(module, "meta") is module and module.weight.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_offload_of_sam2_on_cuda():
    """A real wrapper (SamMasker) parked in host RAM, on the GPU only for its stage."""
    from threedis.engine.tiny.sam2 import tiny_sam2_path

    profile = load_profile("12gb", {"sam2.device": "gpu", "sam2.offload": "model"})
    aux = AuxModels(sam=tiny_sam2_path(), local_files_only=True, models=ModelManager(profile, "cuda", None))
    for _ in range(2):
        inside = aux.run("sam", lambda m: (m.device.type, next(m.model.parameters()).device.type))
        assert inside == ("cuda", "cuda")
        masker = aux.models.loaded("sam2")
        assert masker.device.type == "cpu" and next(masker.model.parameters()).device.type == "cpu"
        del masker
    assert aux.models.placement()["sam2"]["loads"] == 1
