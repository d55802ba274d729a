"""`threedis` command line: render, demo, make-tiny, validate, plan, profiles, bench.

User mistakes print one line (`threedis: error: ...`) and exit with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Sequence

from threedis.engine.errors import UserError

EXIT_USER_ERROR = 2

DESCRIPTION = """\
threedis-flux: multi-instance layout-to-image generation (3DIS-FLUX) on small GPUs.

A layout (a global prompt plus boxes, each with its own description) and a depth
map are rendered by FLUX.1-Depth-dev while each instance's text only shapes its
own region.
"""

EPILOG = """\
examples:
  threedis demo                                  # tiny built-in checkpoint, CPU is fine
  threedis validate examples/two_birds.json
  threedis render layout.json --depth depth.png --model /models/FLUX.1-Depth-dev --out out/
  threedis plan layout.json --profile 12gb
  threedis make-tiny /tmp/tiny-flux
"""


def _user_errors() -> tuple[type[BaseException], ...]:
    from threedis.kernels.rule import RuleError

    return (UserError, RuleError, FileExistsError)


# ---------------------------------------------------------------- arguments


def _add_render_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rendering")
    g.add_argument("--seed", type=int, default=0, help="random seed (same seed = same image as diffusers)")
    g.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    g.add_argument("--guidance", type=float, default=10.0, help="distilled guidance scale (default 10.0)")
    g.add_argument("--chunk", type=int, default=200, help="T5 tokens kept per prompt (default 200)")
    g.add_argument("--hard", type=int, default=None, help="hard-control steps: masked attention for s < HARD (default: all)")
    g.add_argument("--i2i", type=int, default=4, help="steps with image->image restriction on (default 4)")
    g.add_argument("--i2t", type=int, default=None, help="steps with image->text restriction on (default: all)")
    g.add_argument("--t2i", type=int, default=None, help="steps with text->image restriction on (default: all)")
    g.add_argument("--t2t", type=int, default=None, help="steps with text->text restriction on (default: all)")
    g.add_argument("--no-append-instances", action="store_true",
                   help="do not append instance descriptions to the global prompt")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "flex", "sdpa"],
                   help="masked-attention backend (auto: triton on CUDA, else flex/sdpa)")
    g.add_argument("--permute-tokens", action="store_true",
                   help="group image tokens by instance so whole attention tiles can be skipped")
    r = p.add_argument_group("runtime")
    r.add_argument("--profile", default="auto", help="memory profile name or TOML file (default: auto)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile key, e.g. --set transformer.weights=nf4 (repeatable)")
    r.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--lora", default=None, help="FLUX LoRA (diffusers format) file or directory")
    r.add_argument("--lora-scale", type=float, default=1.0, help="LoRA scale (default 1.0)")
    r.add_argument("--local-files-only", action="store_true", help="never try to download weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threedis", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("render", help="render a layout with a depth map",
                       description="Render LAYOUT (JSON) with a depth map into an output folder.")
    p.add_argument("layout", type=Path, help="layout JSON file")
    p.add_argument("--depth", type=Path, default=None, help="depth map image (near = bright)")
    p.add_argument("--model", default=os.environ.get("THREEDIS_MODEL"),
                   help="FLUX.1-Depth-dev: local diffusers folder or hub id (or $THREEDIS_MODEL)")
    p.add_argument("--out", type=Path, default=Path("threedis-out"), help="output folder (default threedis-out)")
    _add_render_options(p)

    p = sub.add_parser("demo", help="render an example layout end to end (tiny checkpoint if no weights)",
                       description="Render a shipped example layout. Without --model it uses a tiny "
                                   "random-weight checkpoint: the picture is noise-like, but every stage runs.")
    p.add_argument("--example", default="two_birds", help="example layout name (see `threedis validate --list`)")
    p.add_argument("--model", default=os.environ.get("THREEDIS_MODEL"),
                   help="real FLUX.1-Depth-dev folder or hub id (default: the tiny checkpoint)")
    p.add_argument("--depth", type=Path, default=None, help="depth map (default: a placeholder drawn from the boxes)")
    p.add_argument("--out", type=Path, default=Path("threedis-out/demo"), help="output folder")
    _add_render_options(p)
    p.set_defaults(steps=None)

    p = sub.add_parser("make-tiny", help="write a tiny random-weight FLUX-depth checkpoint (diffusers layout)")
    p.add_argument("path", type=Path, help="folder to write (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("validate", help="check layout files and explain any problem")
    p.add_argument("layouts", type=Path, nargs="*", help="layout JSON files")
    p.add_argument("--list", action="store_true", help="list the shipped example layouts")

    p = sub.add_parser("plan", help="predict peak VRAM and RAM per stage before loading anything")
    p.add_argument("layout", type=Path, help="layout JSON file (size and instance count are used)")
    p.add_argument("--profile", default="12gb", help="profile name or TOML file (default 12gb)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--chunk", type=int, default=200)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("profiles", help="list the built-in memory profiles")

    p = sub.add_parser("bench", help="run a benchmark (attention)")
    p.add_argument("what", choices=["attention"], help="which benchmark")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    return parser


# ---------------------------------------------------------------- helpers


def _parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE (e.g. transformer.weights=nf4), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _schedule(args: argparse.Namespace, steps: int):
    from threedis.kernels.rule import Schedule

    def pick(value: int | None) -> int:
        return steps if value is None else value

    return Schedule(steps=steps, hard=pick(args.hard), i2i=args.i2i, i2t=pick(args.i2t),
                    t2i=pick(args.t2i), t2t=pick(args.t2t))


class _ProgressBar:
    """tqdm bar fed by the engine's on_step callback."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None

    def __call__(self, step: int, total: int, preview) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="step", file=sys.stderr)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _render(args: argparse.Namespace, layout, model: str, depth, steps: int) -> int:
    from threedis.engine.api import Engine
    from threedis.engine.outputs import save_result

    overrides = _parse_overrides(args.overrides)
    engine = Engine.from_pretrained(
        model, profile=args.profile, overrides=overrides or None, device=args.device,
        local_files_only=args.local_files_only, backend=args.backend,
    )
    if args.lora:
        engine.load_lora(args.lora, scale=args.lora_scale)
    cancel = threading.Event()
    bar = _ProgressBar("denoising")
    try:
        result = engine.render(
            layout, depth=depth, seed=args.seed, steps=steps, guidance=args.guidance,
            schedule=_schedule(args, steps), chunk=args.chunk,
            append_instances=not args.no_append_instances, permute_tokens=args.permute_tokens,
            on_step=bar, cancel=cancel,
        )
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        bar.close()
    paths = save_result(result, args.out)
    print(result.report.table())
    print(f"\nwrote to {args.out}:")
    for kind, path in paths.items():
        print(f"  {kind:<10} {path}")
    return 0


# ---------------------------------------------------------------- commands


def cmd_render(args: argparse.Namespace) -> int:
    from threedis.engine.layout import Layout

    layout = Layout.load(args.layout)
    if not args.model:
        raise UserError("no model given: pass --model with a FLUX.1-Depth-dev folder or hub id "
                        "(or set $THREEDIS_MODEL); `threedis demo` runs on a tiny test checkpoint")
    if args.depth is None:
        raise UserError("no depth map given: pass --depth depth.png (layout -> depth, stage 1, is not "
                        "available in this version)")
    if not args.depth.is_file():
        raise UserError(f"--depth: file not found: {args.depth}")
    return _render(args, layout, args.model, args.depth, args.steps)


def cmd_demo(args: argparse.Namespace) -> int:
    from threedis.engine.layout import Layout, example_path
    from threedis.engine.placeholder_depth import placeholder_depth

    layout = Layout.load(example_path(args.example))
    model = args.model
    if model:
        steps = args.steps or 20
    else:
        from threedis.engine.tiny import tiny_flux_path

        model = str(tiny_flux_path())
        steps = args.steps or 4
        # The tiny checkpoint is for exercising the code: keep it quick on a CPU.
        layout = _shrink_for_tiny(layout)
        print(f"no --model given: using the tiny random-weight checkpoint at {model}")
    if args.depth is not None:
        depth = args.depth
    else:
        depth = placeholder_depth(layout)
        print("no --depth given: using a placeholder depth map drawn from the boxes")
    return _render(args, layout, model, depth, steps)


def _shrink_for_tiny(layout):
    """Same layout at <= 256 px on the long side (multiple of 16), so the demo runs in seconds on CPU."""
    from dataclasses import replace

    scale = min(1.0, 256 / max(layout.width, layout.height))
    width = max(16, int(layout.width * scale) // 16 * 16)
    height = max(16, int(layout.height * scale) // 16 * 16)
    return replace(layout, width=width, height=height)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from threedis.engine.tiny import write_tiny_flux

    if args.path.exists() and any(args.path.iterdir()):
        raise UserError(f"{args.path} exists and is not empty: choose a new folder")
    path = write_tiny_flux(args.path, seed=args.seed)
    print(f"wrote tiny FLUX-depth checkpoint to {path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from threedis.engine.layout import Layout, LayoutError, list_examples

    if args.list:
        for name in list_examples():
            print(name)
        return 0
    if not args.layouts:
        raise UserError("give one or more layout files, or --list for the shipped examples")
    failed = 0
    for path in args.layouts:
        try:
            layout = Layout.load(path)
        except LayoutError as err:
            failed += 1
            print(f"{path}: INVALID: {err}")
            continue
        print(f"{path}: ok ({layout.width}x{layout.height}, {len(layout.instances)} instances)")
    return EXIT_USER_ERROR if failed else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from threedis.engine.layout import Layout
    from threedis.engine.planner import plan
    from threedis.engine.profiles import load_profile

    layout = Layout.load(args.layout)
    profile = load_profile(args.profile, _parse_overrides(args.overrides) or None)
    result = plan(profile, layout.width, layout.height, len(layout.instances), chunk=args.chunk)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from threedis.engine.profiles import list_profiles, load_profile

    for name in list_profiles():
        profile = load_profile(name)
        print(f"{name:<8} {profile.description}")
    print("auto     picks the largest profile that fits the free VRAM (cpu without CUDA)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from threedis.kernels.bench_attention import main as bench_main

    return bench_main(args.bench_args)


COMMANDS = {
    "render": cmd_render,
    "demo": cmd_demo,
    "make-tiny": cmd_make_tiny,
    "validate": cmd_validate,
    "plan": cmd_plan,
    "profiles": cmd_profiles,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as err:
        print(f"threedis: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("threedis: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
