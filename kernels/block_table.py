"""Block-sparse tile tables for the fused kernel: which key blocks each query block visits.

The fused kernel walks (query block x key block) tiles. A tile that holds no
allowed pair is never loaded; a tile whose pairs are all allowed needs no mask
arithmetic. Both facts are decided exactly, from O(L) per-token data and
without an L x L matrix, not even a temporary one:

`allowed(q, k)` depends on the query only through (restriction, membership)
and on the key only through (kind, membership). Each block therefore reduces
to its short list of distinct values ("types"); a tile holds an allowed pair
iff some (query type, key type) combination in it is allowed, and every pair
in it is allowed iff every combination is. The combinations are evaluated in
bounded chunks, so working memory is O(L) whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from threedis.kernels.rule import (
    KIND_IMAGE, KIND_INSTANCE_TEXT, Phases, RuleError, TokenLayout, concrete_device,
)

# Query-type x key-type combinations evaluated at once; caps working memory at
# max(L, _PAIR_CHUNK) pairs whatever the number of distinct types.
_PAIR_CHUNK = 1 << 18


@dataclass(frozen=True, eq=False)
class BlockTable:
    """Per query block, the key blocks to visit (ascending) and whether each needs a mask.

    kv_index: int32[num_q_blocks, max_kv], key-block indices, padded with -1;
    kv_count: int32[num_q_blocks], how many entries of each row are real;
    kv_full: int8[num_q_blocks, max_kv], 1 = every pair of the tile is allowed and
    the key block has no ragged tail, so the kernel applies no mask at all.
    """

    kv_index: torch.Tensor
    kv_count: torch.Tensor
    kv_full: torch.Tensor
    block_m: int
    block_n: int
    length: int

    @property
    def num_q_blocks(self) -> int:
        return -(-self.length // self.block_m)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.length // self.block_n)

    @property
    def tiles(self) -> int:
        return self.num_q_blocks * self.num_kv_blocks

    @property
    def visited(self) -> int:
        return int(self.kv_count.sum())

    @property
    def tile_fraction(self) -> float:
        """Visited tiles / all tiles: the share of dense-attention work the kernel does."""
        return self.visited / self.tiles

    @property
    def full_fraction(self) -> float:
        """Tiles visited without any mask arithmetic / all tiles."""
        return int(self.kv_full.sum()) / self.tiles

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv_index, self.kv_count, self.kv_full))

    def to(self, device: torch.device | str) -> "BlockTable":
        return BlockTable(
            kv_index=self.kv_index.to(device),
            kv_count=self.kv_count.to(device),
            kv_full=self.kv_full.to(device),
            block_m=self.block_m,
            block_n=self.block_n,
            length=self.length,
        )


def _check_blocks(block_m: int, block_n: int) -> None:
    if block_m < 1 or block_n < 1:
        raise RuleError(f"block sizes must be positive, got block_m={block_m}, block_n={block_n}")


def _query_restriction(kind: torch.Tensor, member: torch.Tensor, phases: Phases) -> torch.Tensor:
    """int64 per query: bitmask of key kinds it is restricted towards (same rule as rule.query_restrictions)."""
    image_bits, text_bits = phases.restricted_kinds()
    out = torch.zeros_like(member)
    out = torch.where(kind == KIND_INSTANCE_TEXT, torch.full_like(member, text_bits), out)
    return torch.where((kind == KIND_IMAGE) & (member != 0), torch.full_like(member, image_bits), out)


def _block_types(block: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Distinct (block, a, b) rows, sorted by block: each block's short list of token types."""
    rows = torch.unique(torch.stack([block, a, b], dim=1), dim=0)  # [S, 3], S <= L
    return rows[:, 0], rows[:, 1], rows[:, 2]


def _allowed_types(r_q: torch.Tensor, m_q: torch.Tensor, kind_bit: torch.Tensor, m_k: torch.Tensor) -> torch.Tensor:
    """allowed[i, j] for query types i and key types j (SPEC section 3)."""
    restricted = (r_q[:, None] & kind_bit[None, :]) != 0
    shares = (m_q[:, None] & m_k[None, :]) != 0
    return ~restricted | shares


def _tile_counts(tokens: TokenLayout, phases: Phases, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed type-pairs, all type-pairs) per tile, each int64[num_q_blocks, num_kv_blocks]."""
    member = tokens.member.cpu()
    kind = tokens.kind.cpu().to(torch.int64)
    length = member.shape[0]
    pos = torch.arange(length)
    nq, nk = -(-length // block_m), -(-length // block_n)

    qb, r_q, m_q = _block_types(pos // block_m, _query_restriction(kind, member, phases), member)
    kb, k_kind, m_k = _block_types(pos // block_n, kind, member)
    kind_bit = torch.bitwise_left_shift(torch.ones_like(k_kind), k_kind)

    # Key types are sorted by block: a running sum along them, read at block ends, gives per-tile counts.
    k_end = torch.cumsum(torch.bincount(kb, minlength=nk), 0)  # [nk]
    allowed = torch.zeros(nq, nk, dtype=torch.int64)
    step = max(1, max(length, _PAIR_CHUNK) // max(1, kb.shape[0]))
    for start in range(0, qb.shape[0], step):
        stop = start + step
        ok = _allowed_types(r_q[start:stop], m_q[start:stop], kind_bit, m_k)  # [step, S_k]
        running = torch.nn.functional.pad(ok.cumsum(1, dtype=torch.int32), (1, 0))  # [step, S_k + 1]
        per_tile = running[:, k_end].diff(dim=1, prepend=running[:, :1])  # [step, nk]
        allowed.index_add_(0, qb[start:stop], per_tile.to(torch.int64))
    pairs = torch.bincount(qb, minlength=nq)[:, None] * torch.bincount(kb, minlength=nk)[None, :]
    return allowed, pairs


def _table_from_tiles(visit: torch.Tensor, full: torch.Tensor, block_m: int, block_n: int, length: int) -> BlockTable:
    """Pack bool[nq, nk] visit/full matrices into the padded per-row lists the kernel reads."""
    count = visit.sum(1)
    max_kv = max(1, int(count.max()) if count.numel() else 1)
    # Stable sort puts visited blocks first, in ascending block order.
    order = torch.sort((~visit).to(torch.int8), dim=1, stable=True).indices[:, :max_kv]
    real = torch.arange(max_kv)[None, :] < count[:, None]
    kv_index = torch.where(real, order, torch.full_like(order, -1))
    kv_full = torch.gather(full, 1, order) & real
    return BlockTable(
        kv_index=kv_index.to(torch.int32).contiguous(),
        kv_count=count.to(torch.int32).contiguous(),
        kv_full=kv_full.to(torch.int8).contiguous(),
        block_m=block_m,
        block_n=block_n,
        length=length,
    )


def _complete_kv_blocks(length: int, block_n: int) -> torch.Tensor:
    """bool[nk]: key blocks without a ragged tail (the last one may need a bounds mask)."""
    nk = -(-length // block_n)
    return (torch.arange(nk) + 1) * block_n <= length


def dense_table(length: int, block_m: int, block_n: int, device: torch.device | str = "cpu") -> BlockTable:
    """Every tile visited, all unmasked except the ragged last key block: plain attention."""
    _check_blocks(block_m, block_n)
    nq, nk = -(-length // block_m), -(-length // block_n)
    visit = torch.ones(nq, nk, dtype=torch.bool)
    full = visit & _complete_kv_blocks(length, block_n)[None, :]
    return _table_from_tiles(visit, full, block_m, block_n, length).to(device)


def build_block_table(tokens: TokenLayout, phases: Phases | None, block_m: int, block_n: int) -> BlockTable:
    """The exact table for one layout and phase set, on the CPU (uncached; see `block_table`)."""
    _check_blocks(block_m, block_n)
    if phases is None:
        return dense_table(tokens.length, block_m, block_n)
    allowed, pairs = _tile_counts(tokens, phases, block_m, block_n)
    visit = allowed > 0
    full = (allowed == pairs) & _complete_kv_blocks(tokens.length, block_n)[None, :]
    return _table_from_tiles(visit, full, block_m, block_n, tokens.length)


def _device_key(device: torch.device | str | None, fallback: torch.device) -> torch.device:
    return concrete_device(device if device is not None else fallback)


def block_table(
    tokens: TokenLayout,
    phases: Phases | None,
    block_m: int,
    block_n: int,
    device: torch.device | str | None = None,
) -> BlockTable:
    """`build_block_table`, memoised in `tokens.cache` per (phases, block sizes, device).

    Phases change a handful of times per render, so each table is built once and
    dies with the layout. `device` defaults to the layout's device.
    """
    device = _device_key(device, tokens.device)
    key = ("block_table", phases, block_m, block_n, device)
    table = tokens.cache.get(key)
    if table is None:
        table = build_block_table(tokens, phases, block_m, block_n).to(device)
        tokens.cache[key] = table
    return table


def density(tokens: TokenLayout, phases: Phases | None) -> float:
    """Exact fraction of allowed (query, key) pairs, from token groups, without an L x L matrix.

    Tokens are grouped by (restriction, membership) as queries and (kind, membership)
    as keys; the count is a sum over group pairs of size products.
    """
    if phases is None:
        return 1.0
    member = tokens.member.cpu()
    kind = tokens.kind.cpu().to(torch.int64)
    q_types, q_size = torch.unique(
        torch.stack([_query_restriction(kind, member, phases), member], 1), dim=0, return_counts=True
    )
    k_types, k_size = torch.unique(torch.stack([kind, member], 1), dim=0, return_counts=True)
    kind_bit = torch.bitwise_left_shift(torch.ones_like(k_types[:, 0]), k_types[:, 0])
    total = 0
    step = max(1, max(tokens.length, _PAIR_CHUNK) // k_types.shape[0])
    for start in range(0, q_types.shape[0], step):
        chunk = q_types[start : start + step]
        ok = _allowed_types(chunk[:, 0], chunk[:, 1], kind_bit, k_types[:, 1])  # [step, G_k]
        weight = q_size[start : start + step, None] * k_size[None, :]
        total += int((ok.to(torch.int64) * weight).sum())
    return total / tokens.length**2


@dataclass(frozen=True)
class TileReport:
    """What the membership permutation buys: visited and mask-free tile shares, raster vs permuted."""

    density: float
    raster_tile_fraction: float
    raster_full_fraction: float
    permuted_tile_fraction: float
    permuted_full_fraction: float
    block_m: int
    block_n: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)

    def __str__(self) -> str:
        return (
            f"allowed pairs {self.density:.1%}; tiles visited {self.raster_tile_fraction:.1%} raster, "
            f"{self.permuted_tile_fraction:.1%} permuted; mask-free {self.raster_full_fraction:.1%} raster, "
            f"{self.permuted_full_fraction:.1%} permuted ({self.block_m}x{self.block_n} tiles)"
        )


def tile_report(
    tokens_raster: TokenLayout, tokens_permuted: TokenLayout, phases: Phases | None, block_m: int, block_n: int
) -> TileReport:
    """Compare tile sparsity of one layout in raster order and in `rule.membership_order`."""
    if tokens_raster.length != tokens_permuted.length or not torch.equal(
        torch.sort(tokens_raster.member.cpu()).values, torch.sort(tokens_permuted.member.cpu()).values
    ):
        raise RuleError("tile_report needs the same layout twice: once in raster order, once permuted")
    raster = build_block_table(tokens_raster, phases, block_m, block_n)
    permuted = build_block_table(tokens_permuted, phases, block_m, block_n)
    return TileReport(
        density=density(tokens_raster, phases),
        raster_tile_fraction=raster.tile_fraction,
        raster_full_fraction=raster.full_fraction,
        permuted_tile_fraction=permuted.tile_fraction,
        permuted_full_fraction=permuted.full_fraction,
        block_m=block_m,
        block_n=block_n,
    )
