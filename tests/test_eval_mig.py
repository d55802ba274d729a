"""The whole COCO-MIG chain offline: annotation YAML -> `threedis batch` -> `threedis eval mig` -> table and JSON.

Tiny random-weight checkpoints stand in for every model (FLUX, stage 1, Grounding DINO,
SAM), so the numbers mean nothing; what is checked is that every stage runs for real,
that nothing drops out of a denominator, that a run read through its manifest and the
same images exported for the reference evaluator score the same, and that the cache
makes a second evaluation load no model. The arithmetic itself is in test_eval_metrics.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from threedis.engine.cli import main

# Two prompts in MIGC's mig_bench_anno.yaml layout (made up, not benchmark data): levels 2 and 3.
MIG_YAML = """\
a photo of a red cup and a blue bowl:
  a blue bowl:
  - - 0.5
    - 0.5
    - 0.95
    - 0.95
  a red cup:
  - - 0.05
    - 0.05
    - 0.45
    - 0.5
  coco_id: '3'
a photo of a green car and a yellow bus and a white dog:
  a green car:
  - - 0.0
    - 0.0
    - 0.5
    - 0.5
  a white dog:
  - - 0.1
    - 0.55
    - 0.4
    - 0.95
  a yellow bus:
  - - 0.5
    - 0.1
    - 1.0
    - 0.6
  coco_id: '17'
"""
LEVEL_FIELDS = {"instances", "evaluated", "missing", "successes", "instance_success", "miou", "image_success"}


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    assert main(["make-tiny", "grounding-dino", str(root / "gd")]) == 0
    assert main(["make-tiny", "sam-vit", str(root / "sam")]) == 0
    return ["--detector", str(root / "gd"), "--sam", str(root / "sam"), "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def mig_run(tmp_path_factory):
    """The YAML rendered straight by `threedis batch` on the tiny checkpoints (stage 1 makes each depth map)."""
    root = tmp_path_factory.mktemp("mig-run")
    yaml = root / "mig.yaml"
    yaml.write_text(MIG_YAML)
    run = root / "run"
    assert main(["batch", "--from-mig", str(yaml), "--out", str(run), "--device", "cpu", "--no-progress",
                 "--steps", "1", "--guidance", "3.5", "--size", "64"]) == 0
    return yaml, run


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]


def test_batch_records_the_protocol_settings_and_keeps_stage1_loaded(mig_run):
    _, run = mig_run
    rows = _rows(run)
    assert len(rows) == 2 and {r["meta"]["coco_id"] for r in rows} == {"3", "17"}
    import torch

    for row in rows:
        assert row["settings"] == {"steps": 1, "guidance": 3.5, "width": 64, "height": 64,
                                   "torch_threads": torch.get_num_threads()}
        assert row["run"] == {"jobs_file": "jobs-mig.jsonl", "seeds": "0"}
    loads = [[s for s in json.loads((run / r["files"]["report"]).read_text())["stages"] if s["name"] == "load stage1"]
             for r in rows]
    assert [len(x) for x in loads] == [1, 0], "stage 1 is loaded once for the batch, not once per item"


def test_eval_reads_the_run_and_counts_what_is_missing(mig_run, eval_models, tmp_path, capsys):
    _, run = mig_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    gone = next(r for r in _rows(copy) if r["meta"]["coco_id"] == "17")
    (copy / gone["files"]["image"]).unlink()  # its 3 instances must still be counted, as failures
    capsys.readouterr()
    assert main(["eval", "mig", str(copy), *eval_models]) == 0
    text = capsys.readouterr().out
    assert "L2" in text and "L6" in text and "62.9" in text and "count as failures" in text
    report = json.loads((copy / "eval-mig.json").read_text())
    assert report["items"] == {"expected": 2, "evaluated": 1, "failed": 0, "missing": 1, "unreadable": 0}
    for key in ("L2", "L3", "overall"):
        assert LEVEL_FIELDS <= set(report["pooled"][key])
    assert (report["pooled"]["L3"]["instances"], report["pooled"]["L3"]["evaluated"]) == (3, 0)
    assert report["pooled"]["L3"]["instance_success"] == 0.0 and report["pooled"]["L3"]["miou"] == 0.0
    assert (report["pooled"]["overall"]["instances"], report["pooled"]["overall"]["evaluated"]) == (5, 2)
    assert report["not_evaluated"][0]["item"] == "mig-0001-17/seed-0"
    assert (copy / "eval-mig-cache.jsonl").is_file()


def test_a_run_scored_with_its_yaml_matches_the_run_scored_with_its_jobs(mig_run, eval_models, tmp_path):
    """--from-mig on a run: the jobs read from the yaml as `batch --from-mig` read them (same ids)."""
    yaml, run = mig_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["eval", "mig", str(copy), *eval_models, "--no-cache", "--out", str(tmp_path / "jobs.json")]) == 0
    assert main(["eval", "mig", str(copy), "--from-mig", str(yaml), *eval_models, "--no-cache",
                 "--out", str(tmp_path / "yaml.json")]) == 0
    by_jobs, by_yaml = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("jobs", "yaml"))
    assert by_yaml["items"] == by_jobs["items"] == {"expected": 2, "evaluated": 2, "failed": 0, "missing": 0,
                                                    "unreadable": 0}
    assert by_yaml["pooled"] == by_jobs["pooled"]


def test_seeds_added_by_a_later_command_are_expected_too(mig_run, eval_models, tmp_path):
    _, run = mig_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    first = _rows(copy)[0]
    later = {**first, "seed": 5, "status": "failed", "error": "out of memory", "files": {}, "sha256": None,
             "run": {"jobs_file": "jobs-mig.jsonl", "seeds": "5"}, "finished_at": "2999-01-01T00:00:00+00:00"}
    with open(copy / "manifest.jsonl", "a") as f:
        f.write(json.dumps(later) + "\n")
    assert main(["eval", "mig", str(copy), *eval_models]) == 0
    report = json.loads((copy / "eval-mig.json").read_text())
    assert report["seeds"] == ["0", "5"]
    assert report["items"] == {"expected": 4, "evaluated": 2, "failed": 1, "missing": 1, "unreadable": 0}


def test_a_tampered_manifest_path_is_never_followed(mig_run, eval_models, tmp_path, capsys):
    _, run = mig_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    rows = _rows(copy)
    rows[0]["files"]["image"] = "../../../../../../etc/passwd"
    (copy / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "mig", str(copy), *eval_models, "--no-cache"]) == 0
    report = json.loads((copy / "eval-mig.json").read_text())
    assert report["items"]["missing"] == 1 and "not inside the run folder" in report["not_evaluated"][0]["why"]


def test_export_for_the_reference_evaluator_scores_the_same(mig_run, eval_models, tmp_path, capsys):
    yaml, run = mig_run
    assert main(["eval", "mig", str(run), *eval_models]) == 0
    from_run = json.loads((run / "eval-mig.json").read_text())
    dest = tmp_path / "export"
    assert main(["batch", "export-mig", str(run), str(dest)]) == 0
    names = sorted(p.name for p in (dest / "images").iterdir())
    assert names == ["mig-0000-3_seed0_3.png", "mig-0001-17_seed0_17.png"]  # the reference reads the id after '_'
    truth = json.loads((dest / "sample_prompt_color_split.json").read_text())
    assert truth["3"]["caption"] == "a photo of a red cup and a blue bowl"
    assert truth["3"]["segment"] == [{"label": "blue bowl", "bbox": [0.5, 0.5, 0.95, 0.95]},
                                     {"label": "red cup", "bbox": [0.05, 0.05, 0.45, 0.5]}]
    capsys.readouterr()
    assert main(["eval", "mig", str(dest / "images"), "--truth", str(dest / "sample_prompt_color_split.json"),
                 *eval_models]) == 0
    from_folder = json.loads((dest / "images.eval-mig.json").read_text())
    assert from_folder["pooled"] == from_run["pooled"]
    assert main(["eval", "mig", str(dest / "images"), "--from-mig", str(yaml), *eval_models, "--out",
                 str(tmp_path / "y.json")]) == 0
    assert json.loads((tmp_path / "y.json").read_text())["pooled"] == from_run["pooled"]
    assert not any(p.name.startswith("images.") for p in (dest / "images").iterdir()), "nothing else in the folder"
    assert main(["batch", "export-mig", str(run), str(dest)]) == 2  # not an empty folder: refused
    assert "not an empty folder" in capsys.readouterr().err


def test_a_second_evaluation_comes_from_the_cache(mig_run, eval_models, monkeypatch, tmp_path):
    _, run = mig_run
    first = tmp_path / "first.json"
    assert main(["eval", "mig", str(run), *eval_models, "--out", str(first)]) == 0
    from threedis.engine.eval import models

    def refuse(*args, **kwargs):
        raise AssertionError("every image is cached: no model may load")

    monkeypatch.setattr(models.GroundingDino, "from_pretrained", refuse)
    monkeypatch.setattr(models.SamViT, "from_pretrained", refuse)
    second = tmp_path / "second.json"
    assert main(["eval", "mig", str(run), *eval_models, "--out", str(second)]) == 0
    assert json.loads(first.read_text())["pooled"] == json.loads(second.read_text())["pooled"]


def test_detector_batches_answer_each_pair_as_if_alone(eval_models):
    """Pairs are batched by caption length (no padding): each row's boxes are those of a run on its own."""
    import numpy as np

    from threedis.engine.eval.models import GroundingDino

    detector = GroundingDino.from_pretrained(eval_models[1], device="cpu", local_files_only=True, batch_size=8)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(3)]
    pairs = [(images[0], "cup"), (images[1], "teddy bear"), (images[2], "cup"), (images[0], "dining table"),
             (images[1], "dog")]
    together = detector.detect([p[0] for p in pairs], [p[1] for p in pairs])
    for (image, query), found in zip(pairs, together):
        (alone,) = detector.detect([image], [query])
        np.testing.assert_allclose(found.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(found.scores, alone.scores, atol=1e-5)


def test_a_prompt_the_batch_could_not_render_still_counts(tmp_path, eval_models, capsys):
    """A YAML box the engine refuses (x0 > x1): the batch records the line as failed once; its prompt's
    instances stay in every seed's denominator, and the YAML still scores another method's folder."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(MIG_YAML.replace("    - 0.45\n", "    - 0.01\n"))  # the red cup's x1: now left of its x0
    run = tmp_path / "run"
    assert main(["batch", "--from-mig", str(bad), "--out", str(run), "--seeds", "0-1", "--no-progress", "--size",
                 "64", "--steps", "1", "--device", "cpu",
                 "--depth-model", str(tmp_path / "unused")]) == 1  # no job estimates depth: not refused
    capsys.readouterr()
    assert main(["eval", "mig", str(run), *eval_models]) == 0  # only the good prompt's images are measured
    report = json.loads((run / "eval-mig.json").read_text())
    assert report["items"] == {"expected": 4, "evaluated": 2, "failed": 2, "missing": 0, "unreadable": 0}
    assert (report["pooled"]["L2"]["instances"], report["pooled"]["L2"]["evaluated"]) == (4, 0)
    assert report["pooled"]["L2"]["instance_success"] == 0.0
    assert "x0 = 0.05 must be smaller" in report["not_evaluated"][0]["why"]
    assert "not a COCO-MIG job" not in capsys.readouterr().out
    assert main(["batch", "export-mig", str(run), str(tmp_path / "export")]) == 0
    assert "2 not rendered" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    assert main(["eval", "mig", str(tmp_path / "other"), "--from-mig", str(bad), *eval_models]) == 0
    assert json.loads((tmp_path / "other.eval-mig.json").read_text())["items"]["missing"] == 2


def test_eval_user_mistakes_are_one_line(tmp_path, eval_models, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "a-file").write_bytes(b"")
    (tmp_path / "mig.yaml").write_text(MIG_YAML)
    truth = ["--from-mig", str(tmp_path / "mig.yaml")]
    from threedis.engine.cuda_probe import cuda_surely_absent

    cases = [
        (["eval", "mig", str(tmp_path / "absent")], "not found"),
        (["eval", "mig", str(tmp_path / "a-file"), *truth], "is not a folder"),
        (["eval", "mig", str(tmp_path / "imgs"), *truth, "--device", "bogus"], "not a device name"),
        *([(["eval", "mig", str(tmp_path / "imgs"), *truth, "--device", "cuda"], "CUDA is not available")]
          if cuda_surely_absent() else []),
        (["eval", "mig", str(tmp_path / "imgs")], "--from-mig"),  # a folder needs its ground truth
        (["eval", "mig", str(tmp_path / "imgs"), "--truth", str(tmp_path / "none.json")], "not found"),
        (["eval", "mig", str(tmp_path / "imgs"), "--batch-size", "0"], "--batch-size"),
        (["batch", "export-mig", str(tmp_path / "imgs")], "usage"),
        (["batch", "export-mig", str(tmp_path / "run"), str(tmp_path / "d"), "--steps", "3", "--ray"],
         "--steps, --ray would be ignored"),  # batch's flags do nothing there: said, not dropped silently
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("threedis: error: ") and err.count("\n") == 1 and expected in err, err


def test_bundled_detector_and_sam_configs_have_the_published_sizes():
    """bench/eval_mig.py --random-real and the GPU check build both models from these configs: their sizes must be
    the hub checkpoints' (model.safetensors of IDEA-Research/grounding-dino-tiny: 689 MB, of facebook/sam-vit-huge:
    2.56 GB, float32), and their preprocessor sections the real input sizes (800 px short side, 1024 px long side)."""
    from threedis.engine.eval.models import GroundingDino, SamViT
    from threedis.engine.planner import instantiate_meta, load_config

    for name, published_bytes in (("grounding_dino_tiny", 689e6), ("sam_vit_huge", 2.56e9)):
        params = sum(p.numel() for p in instantiate_meta(load_config(name), name).parameters())
        assert 4 * params == pytest.approx(published_bytes, rel=0.005), name
    detector = GroundingDino.from_model(None, None, load_config("grounding_dino_tiny")["_preprocessor"], "cpu")
    sam = SamViT.from_model(None, load_config("sam_vit_huge")["_preprocessor"], "cpu")
    assert (detector.side, sam.longest, sam.pad) == (800, 1024, (1024, 1024))
    assert detector.normalise.mean == sam.normalise.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("which", ["detector", "sam"])
def test_a_broken_preprocessor_setting_is_one_line_before_the_weights_load(eval_models, tmp_path, which):
    from threedis import UserError
    from threedis.engine.eval.models import GroundingDino, SamViT

    folder = tmp_path / which
    shutil.copytree(eval_models[eval_models.index(f"--{which}") + 1], folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["image_mean"] = ["red", 0.4, 0.4]
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")  # had it loaded, this would be the complaint
    cls = GroundingDino if which == "detector" else SamViT
    with pytest.raises(UserError, match="bad preprocessor setting"):
        cls.from_pretrained(folder, device="cpu", local_files_only=True)
