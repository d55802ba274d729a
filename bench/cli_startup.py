"""Cold-start time of the commands a user types first: `threedis --help`, `validate`, `plan`, and refusals.

Why: a JSON check, an arithmetic plan and a refusal that needs no model (a GPU profile on a
machine without CUDA, a stage-1 folder that is not there) should answer at once; what they
import decides it.
Each command runs in a fresh Python process (nothing imported, the OS file cache warm after
the first repetition), timed from spawn to exit. Two baselines put the numbers in context:
the bare interpreter and `import torch` (which none of these commands may pay: `plan` reads
stored parameter counts and the backend order as data).

Run: python bench/cli_startup.py [--reps 7] [--out bench/results]
Rows (one per command: p20/p50/p80 seconds, device and versions) are JSON lines in
<out>/cli-startup-<host>-<time>.jsonl; a table is printed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata, resources
from pathlib import Path

CLI = [sys.executable, "-m", "threedis.engine.cli"]


def commands(layout: str, folder: str) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """Name -> (argv, the exit codes it may end with); the baselines first. `folder`: an empty folder."""
    refused = [*CLI, "render", layout, "--model", folder, "--out", os.path.join(folder, "out")]
    return {
        "python (baseline)": ([sys.executable, "-c", "pass"], (0,)),
        "import torch (baseline)": ([sys.executable, "-c", "import torch"], (0,)),
        "threedis --help": ([*CLI, "--help"], (0,)),
        "threedis validate": ([*CLI, "validate", layout], (0,)),
        "threedis plan": ([*CLI, "plan", layout, "--profile", "12gb"], (0, 3)),  # 3: over this machine's RAM
        "threedis plan --json --stage1 --sam": ([*CLI, "plan", layout, "--json", "--stage1", "--sam", "--profile",
                                                 "12gb"], (0, 3)),
        "render refused: 12gb on a CPU": ([*refused, "--profile", "12gb", "--device", "cpu"], (2,)),
        "render refused: no stage-1 folder": ([*refused, "--stage1", os.path.join(folder, "missing")], (2,)),
    }


def time_command(argv: list[str], reps: int, cwd: str, codes: tuple[int, ...] = (0,)) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode not in codes:
            raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(sorted(times), n=10, method="inclusive")
    return q[1], statistics.median(times), q[7]


def device_info() -> dict[str, object]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "missing"

    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "os": platform.platform(),
            "versions": {n: version(n) for n in ("threedis-flux", "torch", "diffusers", "transformers")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7, help="runs per command (default 7; the first warms the cache)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    layout = str(Path(os.fspath(resources.files("threedis.examples") / "two_birds.json")))
    info = device_info()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    rows = []
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout: its folders must not shadow packages
        for name, (cmd, codes) in commands(layout, cwd).items():
            time_command(cmd, 1, cwd, codes)  # warm the file cache: "cold" means a fresh process, not a cold disk
            p20, p50, p80 = quantiles(time_command(cmd, args.reps, cwd, codes))
            rows.append({"bench": "cli_startup", "command": name, "argv": cmd[1:], "reps": args.reps,
                         "p20_s": round(p20, 4), "p50_s": round(p50, 4), "p80_s": round(p80, 4),
                         "time": stamp, **info})
            print(f"{name:<38} p50 {p50:6.3f} s   (p20 {p20:.3f}, p80 {p80:.3f})", flush=True)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"cli-startup-{info['host'] or 'host'}-{stamp}.jsonl"
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
        print(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
