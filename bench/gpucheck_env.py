"""GPU check parts 1 and 2: the environment the figures come from, and the CUDA tests.

Part 1 records the card (name, compute capability, memory, driver), the versions the
engine's GPU paths depend on, whether each optional package imports (the GPU machine
gets diffusers, bitsandbytes and optimum-quanto as carried wheels), the Triton kernel's
configuration for this card, and two ceilings the attention figures are read against
(a device-to-device copy and a bf16 matrix product, timed with CUDA events).
Part 2 runs the tests that need CUDA (`pytest -m gpu`) and the test modules that use CUDA
when it is there (their tests run on the GPU instead of Triton's CPU interpreter), in
fresh pytest processes, and keeps the summary and the name and first line of each failure.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from gpucheck_rows import first_line

PER_TEST_S = 180  # pytest-timeout's limit per test, where the plugin is installed: a hang costs one test
# Test modules whose tests run on CUDA when it is present (DEVICE = cuda there) instead of skipping.
CUDA_AWARE_TESTS = ("tests/test_triton_attention.py",)
_SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "power.limit",
               "temperature.gpu", "pstate")
_IMPORTS = ("triton", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "optimum.quanto")


def nvidia_smi() -> dict[str, str] | None:
    """The first GPU as nvidia-smi reports it (no CUDA context is created), None without nvidia-smi."""
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    values = [v.strip() for v in done.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(_SMI_FIELDS, values))


def _imports() -> dict[str, str]:
    out = {}
    for name in _IMPORTS:
        try:
            importlib.import_module(name)
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
            out[name] = first_line(exc)
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:  # which native library bitsandbytes loaded (CUDA 13 needs its cuda130 build)
        ext = getattr(bnb, "cextension", None)
        lib = getattr(ext, "lib", None)
        out["bitsandbytes_library"] = str(getattr(lib, "_name", None) or getattr(ext, "BNB_BACKEND", None) or lib)
    return out


def _gpu(torch: Any, device: Any) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    smi = nvidia_smi() or {}
    return {
        "name": props.name, "capability": f"{props.major}.{props.minor}",
        "memory_gb": round(props.total_memory / 2**30, 2), "multiprocessors": props.multi_processor_count,
        "l2_cache_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "shared_memory_per_block_optin": getattr(props, "shared_memory_per_block_optin", None),
        "driver": smi.get("driver_version"), "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "nvidia_smi": smi,
    }


def _kernel_configs(torch: Any, device: Any) -> dict[str, Any]:
    from threedis.kernels import triton_attention as ta

    out = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        reason = ta.available(device, dtype)
        cfg = ta.choose_config(device, dtype, 128)
        out[name] = {"available": reason is None, "reason": reason, "block_m": cfg.block_m, "block_n": cfg.block_n,
                     "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return out


def _event_ms(torch: Any, fn: Any, reps: int) -> float:
    """Median milliseconds of fn() over reps, timed with CUDA events, after two warm-up calls."""
    from threedis.kernels.bench_attention import time_calls

    times = sorted(time_calls(fn, torch.device("cuda"), warmup=2, reps=reps))
    return times[len(times) // 2] * 1e3


def _copy_ms(torch: Any, device: Any) -> float:
    src = torch.empty(2**30, dtype=torch.float32, device=device).normal_()  # 4 GiB
    dst = torch.empty_like(src)
    return _event_ms(torch, lambda: dst.copy_(src), 10)


def _matmul_ms(torch: Any, device: Any, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return _event_ms(torch, lambda: a @ b, 10)


def _ceilings(torch: Any, device: Any) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate on random data (METHOD: zeros run faster)."""
    n = 8192
    copy_ms = _copy_ms(torch, device)
    mm_ms = _matmul_ms(torch, device, n)
    torch.cuda.empty_cache()
    return {"copy_gb_per_s": round(2 * 4 * 2**30 / (copy_ms / 1e3) / 1e9, 1), "copy_ms": round(copy_ms, 3),
            "bf16_matmul_tflops": round(2 * n**3 / (mm_ms / 1e3) / 1e12, 1), "matmul": f"{n}^3 bf16, random"}


def environment(ctx: Any) -> None:
    """Part 1: one row with the card, versions, imports and kernel configs; one with the ceilings."""
    import torch

    device = ctx.device
    cuda = device.type == "cuda"
    gpu = _gpu(torch, device) if cuda else None
    if gpu is not None:  # first, alone: importing bitsandbytes or quanto below may crash in native code
        ctx.rows.emit("card", gpu=gpu)
    row: dict[str, Any] = {
        "cuda": torch.cuda.is_available(), "dry_run": ctx.dry, "imports": _imports(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.executable,
                 "ram_gb": _ram_gb()},
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF",
                                                "HF_HUB_OFFLINE")},
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "kernel_configs": _kernel_configs(torch, device),
    }
    if gpu is not None:
        row["gpu"] = gpu
    ctx.rows.emit("environment", **row)
    card = (f"{gpu['name']} sm_{gpu['capability'].replace('.', '')} {gpu['memory_gb']} GiB, driver {gpu['driver']}"
            if gpu else "no CUDA device")
    print(f"  {card}, torch {torch.__version__}; imports: "
          + ", ".join(f"{k} {v}" for k, v in row["imports"].items() if k != "bitsandbytes_library"), flush=True)
    if not cuda:
        ctx.rows.not_measured("ceilings", "no CUDA device: copy bandwidth and matmul rate are GPU figures")
        return
    try:
        ceilings = _ceilings(torch, device)
        ctx.rows.emit("ceilings", **ceilings)
        print(f"  copy {ceilings['copy_gb_per_s']} GB/s, bf16 matmul {ceilings['bf16_matmul_tflops']} TFLOP/s",
              flush=True)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory on a smaller card: a row, then carry on
        ctx.rows.emit("ceilings", "error", error=first_line(exc))


def _ram_gb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return round(psutil.virtual_memory().total / 2**30, 1)


# -- part 2 -------------------------------------------------------------------------------------

def gpu_test_files(root: Path) -> list[str]:
    """Test modules holding a `pytest.mark.gpu` test (read as text: collecting every module would import
    the service's and the browser test's dependencies, which the GPU machine lacks)."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))


def _has_plugin(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def pytest_command(xml: Path, select: list[str], files: list[str], per_test_s: int) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE",
           f"--junitxml={xml}", *select, *files]
    if _has_plugin("pytest_timeout"):
        cmd.append(f"--timeout={per_test_s}")
    return cmd


_RESULT = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SUMMARY = re.compile(r"^=+ (.+ in [\d.]+s.*) =+$")


def parse_junit(xml: Path) -> dict[str, Any] | None:
    """Counts and failures (name, first line) from pytest's JUnit XML; None when it was not written."""
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append(f"{name}: {message[0] if message else ''}"[:300])
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def parse_verbose(output: str) -> dict[str, Any]:
    """Counts from `pytest -v` lines, for a run cut off before it wrote its XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
           "XFAIL": "skipped"}
    for line in output.splitlines():
        m = _RESULT.match(line.strip())
        if m:
            counts[key[m.group(2)]] += 1
            if m.group(2) in ("FAILED", "ERROR"):
                failures.append(f"{m.group(1)}: (no message: the run was cut off)")
    return {**counts, "failures": failures}


def run_pytest(ctx: Any, what: str, select: list[str], files: list[str], timeout_s: float, log: Path) -> None:
    """One pytest process; its output goes to `log`, its result to one row."""
    xml = ctx.scratch / f"junit-{len(list(ctx.scratch.iterdir()))}.xml"
    cmd = pytest_command(xml, select, files, per_test_s=PER_TEST_S)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if ctx.device.type == "cuda":
        env.pop("TRITON_INTERPRET", None)  # the tests must compile the kernel, not interpret it
    start = time.time()
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"\n==== {what}: {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ctx.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            output, _ = proc.communicate()
            timed_out = True
        fh.write(output)
    result = parse_junit(xml) if not timed_out else None
    result = result or parse_verbose(output)
    summary = next((m.group(1) for line in reversed(output.splitlines()) if (m := _SUMMARY.match(line.strip()))),
                   output.strip().splitlines()[-1] if output.strip() else "")
    bad = result["failed"] + result["errors"] > 0 or timed_out or proc.returncode not in (0, 5)  # 5: none collected
    ctx.rows.emit(what, "failed" if bad else "ok", **result, summary=summary, timed_out=timed_out,
                  returncode=proc.returncode, wall_s=round(time.time() - start, 1), files=files,
                  command=" ".join(cmd[1:]), log=log.name)
    print(f"  {what}: {summary}{' (cut off at the time limit)' if timed_out else ''}", flush=True)


def cuda_tests(ctx: Any) -> None:
    """Part 2: `pytest -m gpu`, then the CUDA-aware modules' other tests (on CUDA only)."""
    log = ctx.out / ctx.log_name("pytest", "txt")
    files = gpu_test_files(ctx.root)
    cuda = ctx.device.type == "cuda"
    keep = 60 if cuda else 0  # time kept for the second run
    run_pytest(ctx, "pytest -m gpu", ["-m", "gpu"], files, max(30.0, ctx.clock.left() - keep), log)
    what = "CUDA-aware test modules on the GPU"
    if not cuda:
        ctx.rows.not_measured(what, "no CUDA device: these modules run in the CPU suite under Triton's interpreter")
    elif ctx.clock.left() < 30:
        ctx.rows.not_measured(what, f"budget: {ctx.clock.left():.0f} s left")
    else:
        run_pytest(ctx, what, ["-m", "not gpu"], list(CUDA_AWARE_TESTS), ctx.clock.left(), log)
