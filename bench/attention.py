"""Attention benchmark entry point; the logic lives in threedis.kernels.bench_attention.

Usage: python bench/attention.py [--device cuda] [--dtype bf16] [--cases ...] [--out bench/results]
"""

import sys

from threedis.kernels.bench_attention import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
