"""The 3DIS-FLUX attention rule (SPEC section 3) as small named pieces.

Everything here is O(L): a token is described by a membership bitmask over
instances and a kind (global text, instance text, image). Whether query q may
attend to key k follows from those two numbers per token plus four phase
switches, so no backend ever needs an L x L mask except the dense reference
`dense_allowed`, which exists for tests and pictures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from threedis.errors import UserError

# Token kinds, in the order of the columns of SPEC's restriction table.
KIND_GLOBAL_TEXT = 0
KIND_INSTANCE_TEXT = 1
KIND_IMAGE = 2

# Membership is an int64 bitmask; bit 63 is the sign bit, kept clear so that
# every membership value is non-negative (sorting, kernels, FlexAttention).
MAX_INSTANCES = 63


class RuleError(UserError, ValueError):
    """A user-facing problem with regions, masks or a schedule (a UserError: one line, what to change)."""


def _check_instance_count(n: int) -> None:
    if n > MAX_INSTANCES:
        raise RuleError(
            f"{n} instances given, but at most {MAX_INSTANCES} are supported: each token's "
            f"instance membership is a 64-bit integer bitmask with the sign bit kept clear"
        )


def _snap(value: float) -> float:
    """Snap float noise onto integers: 25 * 0.28 is 7.000000000000001, and ceil would add a row."""
    nearest = round(value)
    return float(nearest) if abs(value - nearest) < 1e-9 else value


def box_regions(boxes: Sequence[Sequence[float]] | torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Cells of an h x w token grid covered by each normalised box (x0, y0, x1, y1).

    SPEC rule: cell (r, c) is covered when floor(h*y0) <= r < ceil(h*y1) and
    floor(w*x0) <= c < ceil(w*x1). Computed in float64 so 0.3 * 10 is not 3.0000001.
    Returns BoolTensor[N, grid_h, grid_w].
    """
    rows = [tuple(float(v) for v in box) for box in (boxes.tolist() if torch.is_tensor(boxes) else boxes)]
    _check_instance_count(len(rows))
    out = torch.zeros(len(rows), grid_h, grid_w, dtype=torch.bool)
    for i, box in enumerate(rows):
        if len(box) != 4:
            raise RuleError(f"box {i} has {len(box)} numbers; expected (x0, y0, x1, y1)")
        x0, y0, x1, y1 = box
        r0, r1 = max(math.floor(_snap(grid_h * y0)), 0), min(math.ceil(_snap(grid_h * y1)), grid_h)
        c0, c1 = max(math.floor(_snap(grid_w * x0)), 0), min(math.ceil(_snap(grid_w * x1)), grid_w)
        out[i, r0:r1, c0:c1] = True
    return out


def mask_regions(masks: Sequence[torch.Tensor] | torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Cells covered by per-instance masks of any size: bilinear resize, then > 0.

    Each mask is a 2-D tensor (any numeric dtype, any size); masks may differ in size.
    Returns BoolTensor[N, grid_h, grid_w].
    """
    items = list(masks.unbind(0)) if torch.is_tensor(masks) else list(masks)
    _check_instance_count(len(items))
    out = torch.zeros(len(items), grid_h, grid_w, dtype=torch.bool)
    for i, mask in enumerate(items):
        mask = torch.as_tensor(mask)
        if mask.dim() != 2:
            raise RuleError(f"mask {i} has shape {tuple(mask.shape)}; expected a 2-D (height, width) mask")
        resized = F.interpolate(mask[None, None].double(), size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        out[i] = resized[0, 0] > 0
    return out


def membership_bits(regions: torch.Tensor) -> torch.Tensor:
    """Per-cell instance bitmask from BoolTensor[N, h, w] -> int64[h * w] in raster order."""
    n = regions.shape[0]
    _check_instance_count(n)
    flat = regions.flatten(1).to(torch.int64)  # [N, h*w]; reshape(n, -1) fails for N = 0
    weights = torch.bitwise_left_shift(torch.ones(n, dtype=torch.int64), torch.arange(n, dtype=torch.int64))
    return (flat * weights[:, None]).sum(0) if n else torch.zeros(flat.shape[1], dtype=torch.int64)


def membership_order(regions: torch.Tensor) -> torch.Tensor:
    """Permutation of image cells that groups equal memberships (stable: ties keep raster order).

    Attention sees contiguous regions after applying it, so whole tiles can be
    skipped; every other FLUX op is per-token, so the result is unchanged.
    Returns int64[h * w]: sequence position j holds raster cell order[j].
    """
    bits = membership_bits(regions)
    return torch.sort(bits, stable=True).indices


@dataclass(frozen=True)
class Phases:
    """The four switches of SPEC section 3 at one denoising step."""

    i2i: bool
    i2t: bool
    t2i: bool
    t2t: bool

    def restricted_kinds(self) -> tuple[int, int]:
        """Bitmasks over key kinds that are restricted for (region image queries, instance-text queries).

        Bit `KIND_*` set means: a query of that sort may see keys of that kind only
        when it shares an instance with them. Backends read these two small ints.
        """
        image = 0
        if self.i2t and self.i2i:
            image |= 1 << KIND_GLOBAL_TEXT
        if self.i2t:
            image |= 1 << KIND_INSTANCE_TEXT
        if self.i2i:
            image |= 1 << KIND_IMAGE
        text = 0
        if self.t2t:
            text |= (1 << KIND_GLOBAL_TEXT) | (1 << KIND_INSTANCE_TEXT)
        if self.t2i:
            text |= 1 << KIND_IMAGE
        return image, text

    @property
    def any(self) -> bool:
        return self.i2i or self.i2t or self.t2i or self.t2t


@dataclass(frozen=True)
class Schedule:
    """Phase switches per step. Switch P is on at step s (0-based) iff s < P.

    `hard` is the hard-control window: from step `hard` on the text is cut to the
    global chunk and attention is plain, which `at` reports as None.
    """

    steps: int = 20
    hard: int = 20
    i2i: int = 4
    i2t: int = 20
    t2i: int = 20
    t2t: int = 20

    def __post_init__(self) -> None:
        for name in ("steps", "hard", "i2i", "i2t", "t2i", "t2t"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RuleError(f"schedule.{name} must be a non-negative integer, got {value!r}")
        if self.steps < 1:
            raise RuleError("schedule.steps must be at least 1")

    def at(self, step: int) -> Phases | None:
        if step >= self.hard:
            return None
        return Phases(i2i=step < self.i2i, i2t=step < self.i2t, t2i=step < self.t2i, t2t=step < self.t2t)


def concrete_device(device: torch.device | str) -> torch.device:
    """"cuda" -> "cuda:<current>": per-layout caches are keyed by the device the tensors are on."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """O(L) description of the joint sequence: text chunks first, then image tokens.

    member: int64[L] instance bitmask per token; kind: int8[L] (KIND_*);
    order: int64[h*w] or None, the permutation of image cells (position j holds
    raster cell order[j]); None means raster order.
    cache: per-layout memo for backends (block masks, block tables keyed by
    phases and device), so derived tables are built once per phase change and
    die with the layout: no process-wide state.
    """

    member: torch.Tensor
    kind: torch.Tensor
    text_len: int
    grid: tuple[int, int]
    chunk: int
    num_instances: int
    order: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, regions: torch.Tensor, chunk: int = 200, order: torch.Tensor | None = None) -> "TokenLayout":
        """From BoolTensor[N, h, w] regions: global chunk, N instance chunks, then h*w image tokens."""
        if regions.dim() != 3:
            raise RuleError(f"regions must be [N, h, w]; got shape {tuple(regions.shape)}")
        if chunk < 1:
            raise RuleError(f"chunk must be a positive token count, got {chunk}")
        n, h, w = regions.shape
        _check_instance_count(n)
        image_member = membership_bits(regions.cpu())
        if order is not None:
            order = order.to(device="cpu", dtype=torch.int64)
            if order.shape != (h * w,) or not torch.equal(torch.sort(order).values, torch.arange(h * w)):
                raise RuleError(f"order must be a permutation of the {h * w} image cells")
            image_member = image_member[order]
        inst_bits = torch.bitwise_left_shift(torch.ones(n, dtype=torch.int64), torch.arange(n, dtype=torch.int64))
        text_member = torch.cat([torch.zeros(chunk, dtype=torch.int64), inst_bits.repeat_interleave(chunk)])
        text_kind = torch.full((chunk * (n + 1),), KIND_INSTANCE_TEXT, dtype=torch.int8)
        text_kind[:chunk] = KIND_GLOBAL_TEXT
        image_kind = torch.full((h * w,), KIND_IMAGE, dtype=torch.int8)
        return cls(
            member=torch.cat([text_member, image_member]),
            kind=torch.cat([text_kind, image_kind]),
            text_len=chunk * (n + 1),
            grid=(h, w),
            chunk=chunk,
            num_instances=n,
            order=order,
        )

    @property
    def length(self) -> int:
        return int(self.member.shape[0])

    @property
    def device(self) -> torch.device:
        return self.member.device

    def to(self, device: torch.device | str) -> "TokenLayout":
        return TokenLayout(
            member=self.member.to(device),
            kind=self.kind.to(device),
            text_len=self.text_len,
            grid=self.grid,
            chunk=self.chunk,
            num_instances=self.num_instances,
            order=self.order,
        )


def query_restrictions(tokens: TokenLayout, phases: Phases) -> torch.Tensor:
    """int8[L]: per query, the bitmask of key kinds it is restricted towards (0 = unrestricted)."""
    image_bits, text_bits = phases.restricted_kinds()
    out = torch.zeros_like(tokens.kind)
    region_image = (tokens.kind == KIND_IMAGE) & (tokens.member != 0)
    out[region_image] = image_bits
    out[tokens.kind == KIND_INSTANCE_TEXT] = text_bits
    return out


def dense_allowed(tokens: TokenLayout, phases: Phases | None) -> torch.Tensor:
    """BoolTensor[L, L], allowed[q, k]. The reference for tests and pictures only (O(L^2))."""
    length = tokens.length
    if phases is None:
        return torch.ones(length, length, dtype=torch.bool, device=tokens.device)
    restricted = query_restrictions(tokens, phases).to(torch.int64)
    kind_bit = torch.bitwise_left_shift(torch.ones_like(tokens.member), tokens.kind.to(torch.int64))
    is_restricted = (restricted[:, None] & kind_bit[None, :]) != 0
    shares = (tokens.member[:, None] & tokens.member[None, :]) != 0
    return ~is_restricted | shares
