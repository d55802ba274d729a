"""Shared pytest fixtures. Other test modules append their own below."""

from __future__ import annotations

import os

# One torch thread per test process (and its subprocesses and Ray workers): the suite's models
# are tiny, and on a busy 2-core machine two threads spin-wait on each other at every operation
# (the suite took 2x the CPU time and far more wall time that way). A value set by the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Without CUDA the Triton kernel runs in Triton's CPU interpreter. Triton reads this when a
# kernel is decorated, so it is set here, before any test module imports threedis' kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point $THREEDIS_CACHE at a temp folder so no test reads or fills the user's cache."""
    root = tmp_path_factory.mktemp("threedis-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THREEDIS_CACHE", str(root))
        yield root


@pytest.fixture(scope="session", autouse=True)
def _no_transformers_loading_bars() -> Iterator[None]:
    """transformers' "Loading weights" bar reaches a test's stderr or not depending on which test
    loads first; tests that count the CLI's stderr lines must not depend on the order."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt for this test, as in an interactive shell.

    A test run started in the background (`&`, nohup) inherits SIGINT ignored, and Python then
    keeps it ignored; tests about Ctrl-C set the handler they depend on.
    """
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """An existing empty folder that nobody running this test can write into."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"root ignores chmod, and `chattr +i` is not available here ({done.stderr.strip()[:80]})")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight FLUX.1-Depth-dev checkpoint, written once per test run."""
    from threedis.engine.tiny import write_tiny_flux

    return write_tiny_flux(tmp_path_factory.mktemp("tiny-flux"), seed=0)


@pytest.fixture
def depth_image_64():
    """A 64x64 RGB depth-like control image: a left-to-right ramp with a near square."""
    from PIL import Image, ImageDraw

    img = Image.linear_gradient("L").rotate(90).resize((64, 64)).convert("RGB")
    ImageDraw.Draw(img).rectangle((20, 24, 44, 48), fill=(230, 230, 230))
    return img


@pytest.fixture
def small_flux_transformer():
    """(model, inputs): a 1+1-block FluxTransformer2DModel with our processors and one step's inputs.

    Image grid 4x5 (20 tokens), 15 text tokens (three chunks of 5): for attention and compile tests.
    """
    diffusers = pytest.importorskip("diffusers")
    from threedis.engine.processor import install_processors

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    install_processors(model)
    gen = torch.Generator().manual_seed(8)
    img_ids = torch.stack([torch.zeros(20), torch.arange(4).repeat_interleave(5), torch.arange(5).repeat(4)], 1)
    inputs = dict(
        hidden_states=torch.randn(1, 20, 8, generator=gen), encoder_hidden_states=torch.randn(1, 15, 32, generator=gen),
        pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.6]),
        guidance=torch.tensor([3.5]), img_ids=img_ids, txt_ids=torch.zeros(15, 3), return_dict=False,
    )
    return model, inputs
