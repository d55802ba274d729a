"""Where a model is (threedis.engine.model_paths): one reading and one wording for every loader and the CLI."""

from __future__ import annotations

import pytest

from threedis.engine.errors import UserError
from threedis.engine.model_paths import DEFAULT_MODEL_ID, flux_folder, hf_model_folder, is_hub_id, stage1_folder


@pytest.mark.parametrize("text, expected", [
    ("black-forest-labs/FLUX.1-Depth-dev", True), ("Intel/ldm3d-4c", True), ("a/b", True),
    ("/models/FLUX", False), ("./flux/x", False), ("~/flux", False), (".hidden/x", False), ("flux", False),
    ("a/b/c", False), ("", False),
])
def test_hub_ids(text, expected):
    assert is_hub_id(text) is expected


def test_a_folder_a_file_and_a_missing_folder(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    assert flux_folder(tmp_path) == tmp_path.resolve()
    assert flux_folder(DEFAULT_MODEL_ID) is None  # a hub id: the loader fetches it
    with pytest.raises(UserError, match="is a file"):
        flux_folder(tmp_path / "file.txt")
    for check in (flux_folder, stage1_folder, lambda p: hf_model_folder(p, "SAM2 model", "facebook/sam2", "sam2")):
        with pytest.raises(UserError, match="folder not found"):
            check(tmp_path / "missing")


def _hub_error(monkeypatch, tmp_path) -> str:
    from threedis.engine.loading import resolve_checkpoint

    monkeypatch.setenv("THREEDIS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        resolve_checkpoint(DEFAULT_MODEL_ID, local_files_only=True)
    return str(info.value)


def test_a_flux_model_not_at_hand_says_it_is_gated_and_how_to_log_in(monkeypatch, tmp_path):
    with pytest.raises(UserError) as missing_folder:
        flux_folder("/models/flux")
    for message in (_hub_error(monkeypatch, tmp_path), str(missing_folder.value)):
        assert "hf auth login" in message and "licence" in message, message
        assert "\n" not in message
        # the steps in order: licence and login, download, pass the folder; the tiny stand-in comes last
        login, download = message.index("hf auth login"), message.index("hf download")
        passed, tiny = message.index("pass `--model "), message.index("for a test run")
        assert login < download < passed < tiny, message
        assert not message.rstrip().endswith("then pass DIR"), message
