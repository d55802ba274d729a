"""The stored parameter counts (engine/configs/param_counts.json) equal a fresh meta-device count.

If this fails, a bundled config, diffusers/transformers or the quantizers' skip rules changed:
regenerate with `python -m threedis.engine.planner engine/configs/param_counts.json`.
"""

from __future__ import annotations

import pytest

from threedis.engine import planner as P


@pytest.mark.parametrize("key, config", sorted(P.DEFAULT_CONFIGS.items()))
def test_stored_counts_match_a_fresh_meta_count(key, config):
    stored = P._stored_counts()
    assert config in stored, f"{config} has no stored counts; regenerate {P.COUNTS_FILE}"
    fresh = P.counts_record(P.count_on_meta(key, config), config)
    assert stored[config] == fresh, f"stored counts of {config} are stale; regenerate {P.COUNTS_FILE}"
    assert P.measure_model(key) == P.count_on_meta(key, config)  # the fast path gives the same ModelSize


def test_a_changed_config_is_counted_afresh(monkeypatch):
    """A stored entry whose config digest does not match is ignored, not trusted."""
    stored = {name: {**entry, "params": 1} for name, entry in P._stored_counts().items()}
    monkeypatch.setattr(P, "_stored_counts", lambda: stored)
    assert P.measure_model("vae").params == 1  # the digest matches: the stored entry is used
    stale = {name: {**entry, "config_sha256": "0" * 64} for name, entry in stored.items()}
    monkeypatch.setattr(P, "_stored_counts", lambda: stale)
    assert P.measure_model("vae").params == 83_819_683
