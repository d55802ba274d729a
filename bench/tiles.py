"""Tile sparsity of the shipped example layouts: raster order vs membership order.

For each example layout at its real size (chunk 200), and for the early phases
(all four switches on) and late phases (I2I off), prints and records the exact
density of the allowed matrix and the fraction of (block_m x block_n) tiles the
Triton kernel visits, in raster token order and after `rule.membership_order`.
Pure CPU arithmetic on O(L) data: no GPU needed.

Usage: python bench/tiles.py [--block 128x64] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from threedis.engine.layout import Layout, example_path, list_examples
from threedis.kernels import rule
from threedis.kernels.bench_attention import versions
from threedis.kernels.block_table import tile_report

PHASES = {"early": rule.Phases(True, True, True, True), "late": rule.Phases(False, True, True, True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", default="128x64", help="tile shape BLOCK_MxBLOCK_N (the CUDA bf16 D=128 config)")
    parser.add_argument("--chunk", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    block_m, block_n = (int(v) for v in args.block.lower().split("x"))
    rows = []
    print(f"{'layout':<14} {'size':>9} {'N':>2} {'L':>5} {'phase':<6} {'density':>8} "
          f"{'raster':>7} {'permuted':>8} {'full(perm)':>10}")
    for name in list_examples():
        layout = Layout.load(example_path(name))
        h, w = layout.height // 16, layout.width // 16
        regions = rule.box_regions(layout.boxes, h, w)
        raster = rule.TokenLayout.build(regions, chunk=args.chunk)
        permuted = rule.TokenLayout.build(regions, chunk=args.chunk, order=rule.membership_order(regions))
        for phase_name, phases in PHASES.items():
            rep = tile_report(raster, permuted, phases, block_m, block_n)
            row = {"bench": "tiles", "layout": name, "width": layout.width, "height": layout.height,
                   "instances": len(layout.instances), "L": raster.length, "chunk": args.chunk,
                   "phase": phase_name, **rep.as_dict(), "versions": versions()}
            rows.append(row)
            print(f"{name:<14} {layout.width:>4}x{layout.height:<4} {len(layout.instances):>2} {raster.length:>5} "
                  f"{phase_name:<6} {rep.density:>8.1%} {rep.raster_tile_fraction:>7.1%} "
                  f"{rep.permuted_tile_fraction:>8.1%} {rep.permuted_full_fraction:>10.1%}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tiles-{block_m}x{block_n}.jsonl"
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    print(f"\nrows written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
