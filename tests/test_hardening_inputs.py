"""Issue 10: every bad render argument is one UserError, and no render saves silent garbage.

Each test reproduces one class of the issue's tour: arguments that ended in an
AssertionError/TypeError (now UserError), inputs that gave a black image with
exit 0 (now NonFiniteError), and lossy conversions that said nothing (now a
ThreedisWarning, also listed in result.settings["warnings"]).
"""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from threedis.engine import api, checks
from threedis.engine.api import Engine, as_depth_image
from threedis.engine.cli import EXIT_USER_ERROR, main
from threedis.engine.denoise import image_processor_for, regions_for
from threedis.engine.errors import NonFiniteError, ThreedisWarning, UserError
from threedis.engine.layout import Instance, Layout
from threedis.engine.notices import collect_warnings, warn
from threedis.kernels.rule import Schedule
from threedis.engine.api import RenderOptions, Stage1Options

EXACT = dict(dtype=torch.float32, overrides={"step_cache": "none"})


def layout() -> Layout:
    return Layout("a garden at dawn", 64, 64, (
        Instance("a red bird", (0.1, 0.2, 0.5, 0.8)),
        Instance("a blue jay", (0.5, 0.1, 0.9, 0.7)),
    ))


@pytest.fixture(scope="module")
def engine(tiny_flux_dir, tmp_path_factory) -> Engine:
    return Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa",
                                  cache_dir=tmp_path_factory.mktemp("hardening-cache"), **EXACT)


@pytest.fixture
def processor():
    class Vae:
        class config:
            block_out_channels = (8, 8, 8, 8)
            latent_channels = 16

    return image_processor_for(Vae())


# ------------------------------------------------------------------ arguments -> UserError


@pytest.mark.parametrize("seed, words", [
    (-1, "outside 0..18446744073709551615"), (2**64, "outside"), (1.7, "whole number"), (3.0, "write 3"),
    (True, "whole number"), ("7", "whole number"), (None, "whole number"),
])
def test_bad_seeds(seed, words):
    with pytest.raises(UserError, match=words):
        checks.check_seed(seed)


def test_good_seeds_include_numpy_and_the_top_of_the_range():
    assert checks.check_seed(np.uint64(2**64 - 1)) == 2**64 - 1
    assert checks.check_seed(np.int32(5)) == 5 and checks.check_seed(0) == 0


@pytest.mark.parametrize("guidance, words", [
    (1e308, "outside 0..100"), (-1.0, "outside"), ("abc", "must be a number"), (None, "must be a number"),
    (float("nan"), "nan"), (float("inf"), "inf"), (True, "must be a number"),
])
def test_bad_guidance(guidance, words):
    with pytest.raises(UserError, match=words):
        checks.check_guidance(guidance)


def test_schedule_checks():
    with pytest.raises(UserError, match="got dict"):
        checks.check_schedule({"steps": 4, "hard": 4}, 4)
    with pytest.raises(UserError, match="schedule.i2t = 30 is more than steps = 20"):
        checks.check_schedule(Schedule(steps=20, hard=20, i2i=4, i2t=30), 20)
    with pytest.raises(UserError, match="make them equal"):
        checks.check_schedule(Schedule(steps=5, hard=5, i2i=4, i2t=5, t2i=5, t2t=5), 4)
    checks.check_schedule(Schedule(steps=4, hard=4, i2i=4, i2t=4, t2i=0, t2t=4), 4)


@pytest.mark.parametrize("kwargs, words", [
    (dict(seed=1.7), "seed must be a whole number"),
    (dict(seed=-3), "seed = -3 is outside"),
    (dict(guidance=float("nan")), "guidance is nan"),
    (dict(guidance="abc"), "guidance must be a number"),
    (dict(guidance=None), "guidance must be a number"),
    (dict(guidance=1e308), "outside 0..100"),
    (dict(schedule={"steps": 2}), "Schedule"),
    (dict(schedule=Schedule(steps=2, hard=2, i2i=3, i2t=2, t2i=2, t2t=2)), "schedule.i2i = 3"),
    (dict(cancel=True), "cancel must be a threading.Event"),
    (dict(on_step="print"), "on_step must be a function"),
    (dict(steps=2.0), "steps must be a whole number"),
    (dict(steps=10**9), "steps must be a whole number in 1..1000"),
    (dict(options=lambda: RenderOptions(chunk=0)), "chunk must be"),
    (dict(stage1=lambda: Stage1Options(seed=2**70)), "stage1_seed"),
    (dict(stage1=lambda: Stage1Options(guidance=float("inf"))), "stage1_guidance"),
    (dict(options={"chunk": 8}), "options must be a threedis RenderOptions"),
])
def test_engine_render_raises_user_error_before_any_work(engine, depth_image_64, kwargs, words):
    """Settings objects are made inside the check: they refuse bad values when built."""
    with pytest.raises(UserError, match=words) as info:
        args = {"depth": depth_image_64, "steps": 2, **{k: v() if callable(v) else v for k, v in kwargs.items()}}
        engine.render(layout(), **args)
    assert "\n" not in str(info.value)


def test_a_real_event_and_callbacks_are_accepted(engine, depth_image_64):
    seen = []
    result = engine.render(layout(), depth=depth_image_64, steps=1, options=RenderOptions(chunk=64), cancel=threading.Event(),
                           on_step=lambda *a: seen.append(a[0]), seed=np.int64(3))
    assert seen == [1] and result.seed == 3 and result.settings["warnings"] == []


# ------------------------------------------------------------------ devices


def test_device_parsing(monkeypatch):
    assert checks.parse_device("cpu") == torch.device("cpu")
    assert checks.parse_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert checks.parse_device(None) == torch.device("cpu")
    with pytest.raises(UserError, match="^--device cuda: CUDA is not available on this machine; use --device cpu$"):
        checks.parse_device("cuda")
    with pytest.raises(UserError, match="not a device name"):
        checks.parse_device("gpu please")
    with pytest.raises(UserError, match="not meta"):
        checks.parse_device("meta")
    with pytest.raises(UserError, match="must be a device name"):
        checks.parse_device(5)


def test_engine_without_cuda_says_so(tiny_flux_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        Engine.from_pretrained(tiny_flux_dir, device="cuda", cache_dir=tmp_path)


# ------------------------------------------------------------------ depth maps


@pytest.mark.parametrize("array, words", [
    (np.array([[object(), object()]], dtype=object), "dtype object"),
    (np.full((8, 8), np.nan, dtype=np.float32), "all NaN"),
    (np.full((8, 8), np.inf), "all NaN or infinite"),
    (np.zeros((0, 0), dtype=np.float32), "empty"),
    (np.zeros((4, 4), dtype=np.complex64), "dtype complex64"),
])
def test_unusable_depth_arrays(array, words, processor):
    with pytest.raises(UserError, match=words):
        as_depth_image(array, 64, 64, processor)


def test_partly_nan_depth_warns_and_draws_it_far(processor):
    array = np.tile(np.linspace(0.0, 4.0, 64), (64, 1))
    array[:, :8] = np.nan
    with pytest.warns(ThreedisWarning, match="512 NaN or infinite values of 4096"):
        image = np.asarray(as_depth_image(array, 64, 64, processor).convert("L"))
    assert (image[:, :8] == 0).all() and image[:, -1].min() == 255


def test_32_bit_depth_is_scaled_by_its_real_range(processor):
    values = np.tile(np.linspace(0, 200_000, 64).round().astype(np.int32), (64, 1))  # an 'I' PNG's range
    image = Image.fromarray(values, mode="I")
    got = np.asarray(as_depth_image(image, 64, 64, processor).convert("L")).astype(int)
    expected = np.round(np.linspace(0, 255, 64))  # near = bright, stretched, not clipped at 65535
    assert np.abs(got[0] - expected).max() <= 1
    assert (got == 255).mean() < 0.05  # used to be 74% saturated


def test_16_bit_depth_keeps_its_scale(processor):
    values = np.full((64, 64), 32768, dtype=np.uint16)
    got = np.asarray(as_depth_image(values, 64, 64, processor).convert("L"))
    assert abs(int(got.mean()) - 128) <= 1


def test_depth_of_another_aspect_ratio_warns(processor):
    wide = Image.new("L", (128, 64), 100)
    with pytest.warns(ThreedisWarning, match="depth map is 128x64 but the layout is 64x64"):
        as_depth_image(wide, 64, 64, processor)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThreedisWarning)
        as_depth_image(Image.new("L", (128, 128), 100), 64, 64, processor)  # same shape, other size: fine
        as_depth_image(wide, 64, 64, processor, check_aspect=False)


# ------------------------------------------------------------------ masks and prompts


def test_an_all_black_mask_warns_naming_the_instance():
    masks = [None, Image.new("L", (64, 64), 0)]
    with pytest.warns(ThreedisWarning, match=r"instances\[1\]: its mask is all black"):
        regions = regions_for([(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)], masks, (4, 4))
    assert regions[0].any() and not regions[1].any()


def test_long_prompts_warn_with_token_counts(engine, depth_image_64):
    long = Layout("a garden", 64, 64, (Instance("a red bird " * 10, (0.1, 0.1, 0.6, 0.6)),))
    with pytest.warns(ThreedisWarning, match=r"instances\[0\]\.prompt has \d+ T5 tokens but only the first 8"):
        result = engine.render(long, depth=depth_image_64, steps=1, options=RenderOptions(chunk=8, append_instances=False))
    assert any(w.startswith("instances[0].prompt has") for w in result.settings["warnings"])
    assert result.settings["truncated_prompts"] == [1]


def test_render_warnings_are_recorded_per_render(engine, depth_image_64):
    with pytest.warns(ThreedisWarning):
        stretched = engine.render(layout(), depth=depth_image_64.resize((64, 32)), steps=1, options=RenderOptions(chunk=64))
    assert [w for w in stretched.settings["warnings"] if "stretched" in w]
    plain = engine.render(layout(), depth=depth_image_64, steps=1, options=RenderOptions(chunk=64))
    assert plain.settings["warnings"] == []


def test_warning_collectors_of_two_threads_do_not_mix():
    found: dict[str, list[str]] = {}

    def worker(name: str) -> None:
        with collect_warnings() as mine:
            for i in range(50):
                warn(f"{name} {i}")
        found[name] = mine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThreedisWarning)
        threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert found["a"] == [f"a {i}" for i in range(50)] and found["b"] == [f"b {i}" for i in range(50)]


# ------------------------------------------------------------------ non-finite renders


def test_nan_guidance_inside_the_loop_is_named(engine, depth_image_64, monkeypatch):
    monkeypatch.setattr(api, "check_render_args", lambda **kwargs: None)  # reach the loop: the last line of defence
    with pytest.raises(NonFiniteError, match="at step 1 of 2: guidance is nan"):
        engine.render(layout(), depth=depth_image_64, steps=2, options=RenderOptions(chunk=16), guidance=float("nan"))


def test_one_nan_weight_in_the_transformer_is_named(tiny_flux_dir, depth_image_64, tmp_path):
    engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path, **EXACT)
    transformer = engine.components.transformer
    name, param = next((n, p) for n, p in transformer.named_parameters() if n.startswith("transformer_blocks.0"))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match=f"transformer's weights hold NaN/Inf \\({name}\\)"):
        engine.render(layout(), depth=depth_image_64, steps=2, options=RenderOptions(chunk=16))


def test_nan_in_the_vae_decoder_is_not_a_black_image(tiny_flux_dir, depth_image_64, tmp_path):
    engine = Engine.from_pretrained(tiny_flux_dir, device="cpu", backend="sdpa", cache_dir=tmp_path, **EXACT)
    with torch.no_grad():
        engine.components.vae.decoder.conv_out.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="VAE decoder produced NaN"):
        engine.render(layout(), depth=depth_image_64, steps=1, options=RenderOptions(chunk=16))


# ------------------------------------------------------------------ the CLI: one line, exit 2


@pytest.fixture
def layout_file(tmp_path: Path) -> Path:
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout().to_dict()))
    return path


def one_line(stream: str, prefix: str = "threedis: error: ") -> str:
    lines = stream.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stream, stream
    assert lines[0].startswith(prefix), stream
    return lines[0]


@pytest.mark.parametrize("flags, words", [
    (["--seed", "-1"], "seed = -1 is outside"),
    (["--seed", str(2**64)], "outside"),
    (["--guidance", "nan"], "guidance is nan"),
    (["--guidance", "1e308"], "outside 0..100"),
    (["--hard", "30"], "schedule.hard = 30 is more than steps = 4"),
    (["--hard", "-1"], "schedule.hard must be a non-negative integer"),
    (["--device", "bogus"], "--device 'bogus' is not a device name"),
    (["--stage1-guidance", "inf"], "stage1_guidance is inf"),
])
def test_cli_bad_flags_are_one_line(layout_file, tiny_flux_dir, tmp_path, capsys, flags, words):
    argv = ["render", str(layout_file), "--model", str(tiny_flux_dir), "--out", str(tmp_path / "out"),
            "--steps", "4", *flags]
    assert main(argv) == EXIT_USER_ERROR
    assert words in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_cli_device_cuda_without_cuda(layout_file, tiny_flux_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["render", str(layout_file), "--model", str(tiny_flux_dir), "--device", "cuda"]) == EXIT_USER_ERROR
    assert one_line(capsys.readouterr().err) == (
        "threedis: error: --device cuda: CUDA is not available on this machine; use --device cpu")


def test_cli_fewer_steps_than_the_default_i2i_is_fine(layout_file, tiny_flux_dir, tmp_path, capsys):
    depth = tmp_path / "depth.png"
    Image.linear_gradient("L").resize((64, 32)).save(depth)  # another aspect ratio: a warning, not an error
    argv = ["render", str(layout_file), "--model", str(tiny_flux_dir), "--out", str(tmp_path / "out"),
            "--depth", str(depth), "--steps", "2", "--chunk", "64", "--backend", "sdpa", "--device", "cpu"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("threedis: warning: ")]
    assert len(warning) == 1 and "depth map is 64x32 but the layout is 64x64" in warning[0], err
    assert "Traceback" not in err and "ThreedisWarning" not in err
    meta = json.loads(Image.open(tmp_path / "out" / "image.png").text["threedis"])
    assert meta["schedule"]["i2i"] == 2 and len(meta["warnings"]) == 1


@pytest.mark.parametrize("text", ["[" * 100_000, '{"prompt": "a", "width": ' + "9" * 5000 + ', "height": 64}',
                                  '{"prompt": "a", "width": 100000, "height": 100000}'])
def test_cli_render_of_a_hostile_layout_is_one_line(tmp_path, capsys, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert main(["render", str(path), "--model", "unused"]) == EXIT_USER_ERROR
    one_line(capsys.readouterr().err)
