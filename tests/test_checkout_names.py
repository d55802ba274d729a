"""No folder of the checkout shadows an installed package, however Python is started in its root.

The checkout keeps engine/, kernels/, profiles/ and examples/ at its root (threedis.engine, ...);
`kernels` is also Hugging Face's package that transformers imports. Every test here starts fresh
processes with the checkout root as the working directory, the place a newcomer first tries things.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier() and not p.name.startswith("_"))
LAUNCHES = ["-c", "stdin", "-m"]


def _python(code: str, launch: str, tmp_path: Path, env: dict | None = None, timeout: int = 300):
    """Run `code` from the checkout root as `python -c`, `python -` or `python -m <module>`."""
    env = {**os.environ, **(env or {})}
    if launch == "-c":
        args, stdin = [sys.executable, "-c", code], None
    elif launch == "stdin":
        args, stdin = [sys.executable, "-"], code
    else:  # `python -m` puts the working directory first on sys.path
        runner = tmp_path / "runner_mod"
        runner.mkdir(exist_ok=True)
        (runner / "probe_main.py").write_text(code)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(runner)]))
        args, stdin = [sys.executable, "-m", "probe_main"], None
    return subprocess.run(args, input=stdin, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_checkout_root_holds_the_design_cards_folders():
    assert {"engine", "kernels", "profiles", "bench", "tests"} <= set(TOP_LEVEL)


@pytest.mark.parametrize("launch", LAUNCHES)
def test_an_installed_package_wins_over_every_top_level_folder(tmp_path, launch):
    """A fake installed package named like each top-level folder is what `import NAME` gives."""
    site = tmp_path / "site"
    names = [n for n in TOP_LEVEL if n != "threedis"]
    for name in names:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("WHO = 'installed'\n")
    code = "import importlib, json\nprint(json.dumps({n: importlib.import_module(n).WHO for n in %r}))\n" % names
    proc = _python(code, launch, tmp_path, env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {n: "installed" for n in names}


@pytest.mark.parametrize("launch", LAUNCHES)
def test_without_an_installed_package_the_bare_names_do_not_import(tmp_path, launch):
    names = [n for n in TOP_LEVEL if (ROOT / n / "__init__.py").exists() and n != "threedis"]
    assert {"engine", "kernels", "profiles", "examples"} <= set(names)
    code = (
        "import importlib, json, sys\n"
        "sys.modules.pop('kernels', None)\n"
        "out = {}\n"
        "for n in %r:\n"
        "    try:\n"
        "        m = importlib.import_module(n)\n"
        "        out[n] = 'ours' if m.__file__ and m.__file__.startswith(%r) else 'installed'\n"
        "    except ModuleNotFoundError:\n"
        "        out[n] = 'missing'\n"
        "print(json.dumps(out))\n"
    ) % (names, str(ROOT))
    proc = _python(code, launch, tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.splitlines()[-1])
    assert all(v != "ours" for v in found.values()), found


@pytest.mark.parametrize("launch", LAUNCHES)
def test_transformers_activations_and_threedis_kernels_import_from_the_root(tmp_path, launch):
    code = (
        "import transformers.activations\n"
        "import threedis.kernels, threedis.kernels.rule\n"
        "import kernels\n"
        "print(kernels.__file__)\n"
    )
    proc = _python(code, launch, tmp_path)
    if "No module named 'kernels'" in proc.stderr:  # a transformers that does not need Hugging Face's kernels
        code = code.replace("import kernels\nprint(kernels.__file__)\n", "print('none')\n")
        proc = _python(code, launch, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not proc.stdout.strip().startswith(str(ROOT)), proc.stdout


def test_tiny_checkpoint_loads_in_diffusers_flux_control_pipeline_from_the_root(tmp_path, tiny_flux_dir):
    code = (
        "import diffusers, torch\n"
        f"pipe = diffusers.FluxControlPipeline.from_pretrained({str(tiny_flux_dir)!r}, torch_dtype=torch.float32)\n"
        "print(type(pipe.transformer).__name__, type(pipe.text_encoder).__name__)\n"
    )
    proc = _python(code, "stdin", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["FluxTransformer2DModel", "CLIPTextModel"]


def test_readme_snippet_runs_from_the_root(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert 'result.save("out")' in block
    block = block.replace('result.save("out")', f"result.save({str(tmp_path / 'out')!r})")  # not into the checkout
    proc = _python(block, "stdin", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "denoising: 4/4" in proc.stdout
    assert (tmp_path / "out" / "image.png").is_file()


@pytest.mark.slow
def test_two_worker_ray_batch_from_the_root(tmp_path, tiny_flux_dir):
    pytest.importorskip("ray")
    layout = {"prompt": "two birds", "width": 64, "height": 64,
              "instances": [{"prompt": "a red bird", "box": [0.1, 0.2, 0.5, 0.7]}]}
    depth = tmp_path / "depth.png"
    from PIL import Image

    Image.linear_gradient("L").resize((64, 64)).save(depth)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": f"j{n}", "layout": layout, "depth": str(depth), "steps": 2}) + "\n"
                            for n in range(2)))
    out = tmp_path / "run"
    args = [sys.executable, "-m", "threedis.engine.cli", "batch", str(jobs), "--out", str(out),
            "--model", str(tiny_flux_dir), "--ray", "--workers", "2"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["job"] for r in rows) == ["j0", "j1"] and all(r["status"] == "done" for r in rows)


def test_no_script_folder_module_is_named_like_an_installed_or_standard_module():
    """pytest puts tests/ on sys.path, `python bench/x.py` puts bench/ there: their modules must not shadow."""
    import importlib.metadata

    taken = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    ours = {p.stem for folder in ("tests", "bench", "docs") for p in (ROOT / folder).glob("*.py")}
    assert ours and not ours & taken, sorted(ours & taken)
