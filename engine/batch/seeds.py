"""Seed lists as users write them: 7, "0-3", "0,2,5-7", [1, 2]."""

from __future__ import annotations

from typing import Any

from threedis.engine.checks import check_seed
from threedis.engine.errors import UserError

MAX_SEEDS_PER_JOB = 100_000  # a typo such as "0-99999999" should be an error, not a frozen terminal


def _whole_seed(value: Any, where: str) -> int:
    """One seed in the engine's range (checks.check_seed: 0..2^64-1, as render takes it)."""
    return check_seed(value, f"{where}: seed")


def parse_seeds(value: Any, where: str = "seeds") -> tuple[int, ...]:
    """Seeds from an int, a list of ints, or text like "0-3" / "0,2,5-7"; duplicates dropped, order kept."""
    if isinstance(value, str):
        seeds: list[int] = []
        for part in value.replace(" ", "").split(","):
            first, dash, last = part.partition("-")
            if not first.isdigit() or (dash and not last.isdigit()):
                raise UserError(f"{where}: cannot read {value!r}; write seeds like 7, 0-3 or 0,2,5-7")
            lo, hi = int(first), int(last) if dash else int(first)
            check_seed(hi, f"{where}: seed")
            if hi < lo:
                raise UserError(f"{where}: range {part!r} runs backwards; write {hi}-{lo}")
            if hi - lo >= MAX_SEEDS_PER_JOB:
                raise UserError(f"{where}: range {part!r} has more than {MAX_SEEDS_PER_JOB} seeds")
            seeds.extend(range(lo, hi + 1))
    elif isinstance(value, list):
        seeds = [_whole_seed(v, where) for v in value]
    else:
        seeds = [_whole_seed(value, where)]
    if not seeds:
        raise UserError(f"{where}: no seeds given")
    if len(seeds) > MAX_SEEDS_PER_JOB:
        raise UserError(f"{where}: more than {MAX_SEEDS_PER_JOB} seeds")
    return tuple(dict.fromkeys(seeds))
