"""One seed range, 0..2^64-1 (what torch.Generator.manual_seed takes), wherever a seed is read.

The authors' demo seed 11279306965410786290 is above 2^63: the service once refused it while
`threedis render` took it. Every reader now calls checks.check_seed; these tests feed each
reader the edges of the range. No model is loaded.
"""

from __future__ import annotations

import pytest

from threedis import UserError
from threedis.engine.checks import SEED_MAX, check_render_args, check_seed

DEMO_SEED = 11279306965410786290


def test_the_range_is_torchs():
    import torch

    assert SEED_MAX == 2**64 - 1 and DEMO_SEED > 2**63
    torch.Generator().manual_seed(SEED_MAX)  # the top of the range is a seed torch takes
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(SEED_MAX + 1)
    assert check_seed(DEMO_SEED) == DEMO_SEED
    for bad in (SEED_MAX + 1, -1, 1.5, True, "7"):
        with pytest.raises(UserError):
            check_seed(bad)


def test_render_arguments_and_stage1_options_take_the_whole_range():
    from threedis import Stage1Options

    check_render_args(steps=4, seed=DEMO_SEED, guidance=3.5)
    check_render_args(steps=4, seed=SEED_MAX, guidance=3.5)
    assert Stage1Options(seed=SEED_MAX).seed == SEED_MAX
    with pytest.raises(UserError, match="outside 0..18446744073709551615"):
        check_render_args(steps=4, seed=SEED_MAX + 1, guidance=3.5)
    with pytest.raises(UserError, match="stage1_seed"):
        Stage1Options(seed=SEED_MAX + 1)


def test_batch_seed_lists_take_the_whole_range(tmp_path):
    from threedis.engine.batch.jobs import JobDefaults, parse_job
    from threedis.engine.batch.seeds import parse_seeds

    assert parse_seeds(DEMO_SEED) == (DEMO_SEED,)
    assert parse_seeds(str(DEMO_SEED)) == (DEMO_SEED,)
    assert parse_seeds(f"{SEED_MAX - 1}-{SEED_MAX}") == (SEED_MAX - 1, SEED_MAX)
    assert parse_seeds([0, SEED_MAX]) == (0, SEED_MAX)
    for bad in (SEED_MAX + 1, str(SEED_MAX + 1), f"{SEED_MAX}-{SEED_MAX + 1}", [1, -1]):
        with pytest.raises(UserError, match="seed"):
            parse_seeds(bad)
    layout = {"prompt": "a street", "width": 64, "height": 64, "instances": []}
    job = parse_job({"layout": layout, "seeds": [DEMO_SEED]}, 1, tmp_path, JobDefaults())
    assert job.problem is None and job.seeds == (DEMO_SEED,)
    refused = parse_job({"layout": layout, "seeds": [SEED_MAX + 1]}, 2, tmp_path, JobDefaults())
    assert "18446744073709551615" in refused.problem


def test_the_services_options_take_the_whole_range(tmp_path):
    from threedis.engine.serve.history import History
    from threedis.engine.serve.requests import Defaults, RequestError, check_options
    from threedis.engine.serve.uploads import UploadStore

    history = History(tmp_path / "history.sqlite3")
    uploads = UploadStore(tmp_path / "uploads", history, 1000, 1000)
    try:
        options = check_options({"seed": DEMO_SEED}, "render", Defaults(), uploads, lambda _: False)
        assert options["seed"] == DEMO_SEED
        stage1 = {"source": "stage1", "stage1": {"seed": SEED_MAX}}
        assert check_options({"depth": stage1}, "depth", Defaults(), uploads, lambda _: False)["depth"][
            "stage1"]["seed"] == SEED_MAX
        with pytest.raises(RequestError) as err:
            check_options({"seed": SEED_MAX + 1}, "render", Defaults(), uploads, lambda _: False)
        assert err.value.problems[0]["field"] == "options.seed"
    finally:
        history.close()


def test_the_render_command_says_the_range(tiny_flux_dir, tmp_path, capsys):
    from threedis.engine import cli
    from threedis.engine.layout import example_path

    depth = tmp_path / "depth.png"
    from PIL import Image

    Image.new("L", (64, 64), 128).save(depth)
    code = cli.main(["render", str(example_path("two_birds")), "--model", str(tiny_flux_dir), "--depth", str(depth),
                     "--out", str(tmp_path / "o"), "--seed", str(SEED_MAX + 1)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "outside 0..18446744073709551615" in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()
