"""One rule for renders on tiny checkpoints: the demo's numbers unless given, decided by the model that runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from threedis import Stage1Options
from threedis.engine import tiny_rules
from threedis.engine.stages import TINY_STAGE1, default_stage1


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    """Folders that carry the tiny markers (their contents are not read by the rule)."""
    root = tmp_path_factory.mktemp("tiny-marked")
    folders = {"flux": root / "flux", "ldm3d": root / "ldm3d", "real": root / "real"}
    for path in folders.values():
        path.mkdir()
    (folders["flux"] / tiny_rules.MARKER).write_text('{"version": 1, "seed": 0}')
    (folders["ldm3d"] / tiny_rules.LDM3D_MARKER).write_text('{"version": 1, "seed": 0}')
    return folders


def test_the_written_tiny_checkpoints_carry_the_markers_the_rule_reads(tiny_flux_dir):
    from threedis.engine.tiny.ldm3d import tiny_ldm3d_path

    assert tiny_rules.is_tiny(tiny_flux_dir) and tiny_rules.is_tiny(tiny_ldm3d_path())
    assert not tiny_rules.is_tiny("black-forest-labs/FLUX.1-Depth-dev") and not tiny_rules.is_tiny(None)


def test_stage1_defaults_follow_the_stage1_model(tiny_folders):
    assert default_stage1(tiny_folders["ldm3d"]) == TINY_STAGE1
    assert (TINY_STAGE1.steps, TINY_STAGE1.migc_steps, TINY_STAGE1.size) == (4, 2, (64, 64))
    for real in ("auto", "Intel/ldm3d-4c", tiny_folders["real"], None):
        assert default_stage1(real) == Stage1Options() and Stage1Options().size == (512, 512)


def test_steps_follow_the_flux_model(tiny_folders):
    assert tiny_rules.steps_for(tiny_folders["flux"], None) == 4
    assert tiny_rules.steps_for(tiny_folders["flux"], 9) == 9  # given: kept
    assert tiny_rules.steps_for(tiny_folders["real"], None) == 20


def test_the_service_and_batch_use_the_same_numbers(tiny_folders):
    from threedis.engine.batch.jobs import TINY_DEFAULTS as BATCH
    from threedis.engine.serve.requests import Defaults, defaults_for

    assert BATCH.steps == tiny_rules.STEPS and BATCH.stage1 == TINY_STAGE1
    tiny = Defaults(steps=4, stage1_steps=4, stage1_migc_steps=2, stage1_size=64)
    assert defaults_for(None, None) == tiny  # `threedis serve`: the built-in tiny checkpoints
    assert defaults_for(str(tiny_folders["real"]), str(tiny_folders["ldm3d"])) == Defaults(
        steps=20, stage1_steps=4, stage1_migc_steps=2, stage1_size=64)  # a real FLUX with a tiny stage 1
    assert defaults_for(None, "Intel/ldm3d-4c") == Defaults(steps=4)  # the tiny FLUX with the real stage 1
    assert defaults_for(str(tiny_folders["real"]), None) == Defaults()
