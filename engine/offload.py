"""Moving models between host and GPU: whole models, and groups of blocks during a forward.

Why a module of our own: diffusers' group offloading (`apply_group_offloading`) moves
a group by reassigning `param.data`, which is right for plain and fp8 tensors but
leaves quantization state behind for the libraries we quantize with: bitsandbytes
keeps NF4 statistics in `Params4bit.quant_state` and int8 row scales in
`Int8Params.SCB`, optimum-quanto keeps `_data`/`_scale` inside a wrapper tensor
(diffusers issue #12610: "Quanto + Group Offload causes device mismatch"). So:

- plain / fp8 weights: diffusers' hooks (`apply_group_offloading`, block level, CUDA
  streams when asked), unchanged;
- bitsandbytes / quanto weights: `BlockOffloader` below, which moves each group with
  `Module.to` (the libraries' own device moves) plus the int8 scale fix in
  `move_model`. Its cost over diffusers' hooks: the host copy is rebuilt on every
  offload (one device->host copy per group per step) because `Module.to` does not
  keep the pinned host copy that diffusers reuses.

Only CUDA moves cost anything; on a CPU-only machine every move is a no-op but the
bookkeeping (which group is on the compute device when) runs the same way.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

__all__ = ["BlockOffloader", "apply_group_offload", "has_quantized_tensors", "move_model", "move_parts",
           "release_memory"]

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # FLUX, in execution order


def has_quantized_tensors(model: nn.Module) -> bool:
    """True when bitsandbytes or quanto modules hold weights (their state needs Module.to moves)."""
    names = {type(m).__name__ for m in model.modules()}
    return bool(names & {"Linear4bit", "Linear8bitLt", "QLinear", "QConv2d", "QLayerNorm"})


def move_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model.to(device)` that also moves bitsandbytes int8 codes and row scales.

    Int8Params.to returns a new parameter with CB/SCB moved, but Module.to (between CPU
    and CUDA) keeps the old parameter object and only swaps its `.data`, so the `CB`
    and `SCB` attributes, and `Linear8bitLt.state.CB/SCB` after a first forward, would
    stay behind: the layer would then run with codes on the old device, and the old
    copy would keep its memory. CB is the int8 weight itself, so it is re-pointed at
    the moved `.data` (no second copy).
    """
    device = torch.device(device)
    nn.Module.to(model, device)  # plain nn.Module.to: no dtype casts of packed storage
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            _follow(weight, device, weight.data)
            state = getattr(module, "state", None)
            if state is not None:
                _follow(state, device, weight.data)
    return model


def _follow(holder: object, device: torch.device, data: torch.Tensor) -> None:
    """Move `holder.CB` (re-pointed at `data` when it is the same int8 matrix) and `holder.SCB`."""
    cb = getattr(holder, "CB", None)
    if isinstance(cb, torch.Tensor) and cb.device != device:
        same = cb.shape == data.shape and cb.dtype == data.dtype and data.device == device
        holder.CB = data if same else cb.to(device)
    scb = getattr(holder, "SCB", None)
    if isinstance(scb, torch.Tensor) and scb.device != device:
        holder.SCB = scb.to(device)


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for name in BLOCK_LISTS:
        blocks.extend(getattr(model, name, None) or [])
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no {' or '.join(BLOCK_LISTS)} to offload in groups")
    return blocks


class BlockOffloader:
    """Keeps at most two groups of `blocks_per_group` blocks on the compute device.

    Everything outside the blocks (embedders, final norm and projection: <1% of FLUX)
    stays on the compute device. A group is moved in by a pre-hook on its first block
    and moved out by a hook on its last; with streams the next group is copied on a
    side CUDA stream while the current one computes. Blocks a step cache skips never
    run their hooks: `onload` then evicts any group that is neither the current nor
    the prefetched one, so memory stays bounded at two groups.
    """

    def __init__(self, model: nn.Module, onload: torch.device | str, blocks_per_group: int = 1,
                 use_streams: bool = False, offload: torch.device | str = "cpu") -> None:
        self.onload, self.offload = torch.device(onload), torch.device(offload)
        blocks = _blocks(model)
        n = max(1, int(blocks_per_group))
        self.groups: list[list[nn.Module]] = [blocks[i: i + n] for i in range(0, len(blocks), n)]
        self.stream = torch.cuda.Stream(self.onload) if use_streams and self.onload.type == "cuda" else None
        self.on_device: set[int] = set()
        self.onloads = 0            # group moves to the compute device (bookkeeping, tests)
        self.max_resident = 0
        self._ready: dict[int, Any] = {}  # group -> CUDA event of its prefetch copy
        for name, child in model.named_children():  # the small rest lives on the compute device
            if name not in BLOCK_LISTS:
                move_model(child, self.onload)
        for name in [*model._parameters, *model._buffers]:
            _move_tensor(model, name, self.onload)
        for g in self.groups:
            for block in g:
                move_model(block, self.offload)
        self._handles = []
        for index, group in enumerate(self.groups):
            self._handles.append(group[0].register_forward_pre_hook(lambda m, a, i=index: self._enter(i)))
            self._handles.append(group[-1].register_forward_hook(lambda m, a, o, i=index: self._leave(i)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _move(self, index: int, device: torch.device) -> None:
        for block in self.groups[index]:
            move_model(block, device)

    def _enter(self, index: int) -> None:
        nxt = (index + 1) % len(self.groups)
        for other in sorted(self.on_device - {index, nxt}):
            self._move(other, self.offload)
            self.on_device.discard(other)
        event = self._ready.pop(index, None)
        if index not in self.on_device:
            self._move(index, self.onload)
            self.on_device.add(index)
            self.onloads += 1
        elif event is not None:
            torch.cuda.current_stream(self.onload).wait_event(event)
        if self.stream is not None and nxt != index and nxt not in self.on_device:
            with torch.cuda.stream(self.stream):
                self._move(nxt, self.onload)
            self._ready[nxt] = self.stream.record_event()
            self.on_device.add(nxt)
            self.onloads += 1
        self.max_resident = max(self.max_resident, len(self.on_device))

    def _leave(self, index: int) -> None:
        # The copy to the host runs on the current stream and blocks until the group's
        # kernels are done, so its device memory is free to reuse afterwards.
        self._move(index, self.offload)
        self.on_device.discard(index)


def _move_tensor(module: nn.Module, name: str, device: torch.device) -> None:
    if module._parameters.get(name) is None and module._buffers.get(name) is None:
        return
    if name in module._parameters:
        p = module._parameters[name]
        module._parameters[name] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
    else:
        module._buffers[name] = module._buffers[name].to(device)


def apply_group_offload(model: nn.Module, onload: torch.device | str, blocks_per_group: int,
                        use_streams: bool) -> BlockOffloader | None:
    """Stream `model`'s blocks to `onload` in groups during each forward.

    Plain/fp8 weights: diffusers' group offloading (returns None). Quantized weights:
    a BlockOffloader (returned, for its bookkeeping).
    """
    onload = torch.device(onload)
    if has_quantized_tensors(model):
        return BlockOffloader(model, onload, blocks_per_group, use_streams)
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(model, onload_device=onload, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=max(1, int(blocks_per_group)),
                           use_stream=bool(use_streams) and onload.type == "cuda")
    return None


def move_parts(holder: Any, device: torch.device | str) -> Any:
    """Move a model, or every model a wrapper holds (stage 1's pipeline, SAM2's masker), to `device`.

    A wrapper sends its inputs to its `device` attribute, so that follows the move too.
    Returns the moved object (the same one).
    """
    device = torch.device(device)
    if isinstance(holder, nn.Module):
        return move_model(holder, device)
    for value in vars(holder).values():
        if isinstance(value, nn.Module):
            move_model(value, device)
    if isinstance(getattr(holder, "device", None), torch.device):
        holder.device = device
    return holder


def release_memory(device: torch.device | str) -> None:
    """Hand memory back after a model is dropped or moved away.

    Collects cycles first (hooks and closures keep models alive), then returns the
    CUDA caching allocator's free blocks so the next model (or another process) gets them.
    """
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
