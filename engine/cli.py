"""`threedis` command line: render, demo, batch, serve, depth, convert-weights, make-tiny, validate, plan, profiles,
bench.
User mistakes print one line (`threedis: error: ...`) and exit with code 2;
anything else is a bug and keeps its traceback.

Most engine modules import torch (seconds), so each command imports what it needs
inside its function: `--help` and `validate` answer without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from threedis.engine.errors import ThreedisWarning, UserError
from threedis.engine.layout import Layout, LayoutError, list_examples
from threedis.engine.profiles import list_profiles, load_profile, resolved_toml

EXIT_USER_ERROR = 2

DESCRIPTION = """\
threedis-flux: multi-instance layout-to-image generation (3DIS-FLUX) on small GPUs.

A layout (a global prompt plus boxes, each with its own description) becomes a
depth map (stage 1: LDM3D + layout adapter; or your own depth map, or one
estimated from a photo), optionally tighter instance masks (SAM2), and then an
image rendered by FLUX.1-Depth-dev while each instance's text only shapes its
own region.
"""

EPILOG = """\
examples:
  threedis demo                                  # tiny built-in checkpoints, CPU is fine
  threedis validate examples/two_birds.json
  threedis render layout.json --model /models/FLUX.1-Depth-dev --out out/          # stage 1 makes the depth
  threedis render layout.json --model /models/FLUX.1-Depth-dev --sam --out out/    # + SAM2 instance masks
  threedis render layout.json --depth depth.png --model /models/FLUX.1-Depth-dev --out out/
  threedis depth photo.jpg --out depth.png       # Depth Anything V2
  threedis plan layout.json --profile 12gb
  threedis batch jobs.jsonl --out runs/a --seeds 0-3 [--ray [ADDRESS]]   # many layouts x seeds, resumable
  threedis serve --open                          # web layout editor + local API on 127.0.0.1:7860
  threedis make-tiny all /tmp/tiny                # random-weight test checkpoints
"""


def _user_errors() -> tuple[type[BaseException], ...]:
    # A RuleError can only come from an imported rule module: looking it up here instead of
    # importing it keeps `validate` free of torch.
    rule = sys.modules.get("threedis.kernels.rule")
    return (UserError, FileExistsError, *((rule.RuleError,) if rule is not None else ()))


# ---------------------------------------------------------------- arguments


def _add_render_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rendering")
    g.add_argument("--seed", type=int, default=0, help="random seed (same seed = same image as diffusers)")
    g.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    g.add_argument("--guidance", type=float, default=10.0, help="distilled guidance scale (default 10.0)")
    g.add_argument("--chunk", type=int, default=200, help="T5 tokens kept per prompt (default 200)")
    g.add_argument("--hard", type=int, default=None, help="hard-control steps: masked attention for s < HARD (default: all)")
    g.add_argument("--i2i", type=int, default=None,
                   help="steps with image->image restriction on (default 4, or --steps if fewer)")
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


_SAM_DEFAULT = "(default)"  # --sam without a value: the engine's default SAM2 id

# The tiny checkpoints only exercise the code: sizes and step counts that keep the demo to seconds on a CPU.
_TINY_STEPS, _TINY_STAGE1_STEPS, _TINY_MIGC_STEPS, _TINY_STAGE1_SIZE = 4, 4, 2, 64
_TINY_MAX_SIDE = 256  # the demo layout's long side on the tiny checkpoint


def _size_arg(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> (768, 512) (width x height): the API's reading (stages.parse_size)."""
    from threedis.engine.sizes import parse_size

    try:
        return parse_size(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_depth_options(p: argparse.ArgumentParser, stage1_help: str) -> None:
    g = p.add_argument_group("depth map and masks")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--depth", type=Path, default=None, help="depth map image (near = bright); skips stage 1")
    source.add_argument("--depth-from-photo", type=Path, default=None, metavar="PHOTO",
                        help="estimate the depth map from a photo (Depth Anything V2); skips stage 1")
    g.add_argument("--depth-model", default=os.environ.get("THREEDIS_DEPTH_MODEL"), metavar="PATH_OR_ID",
                   help="depth estimator for --depth-from-photo (default depth-anything/Depth-Anything-V2-Large-hf "
                        "or $THREEDIS_DEPTH_MODEL)")
    g.add_argument("--stage1", default=os.environ.get("THREEDIS_STAGE1"), metavar="PATH_OR_ID", help=stage1_help)
    g.add_argument("--stage1-steps", type=int, default=None, help="stage-1 steps (default 30)")
    g.add_argument("--stage1-guidance", type=float, default=6.5, help="stage-1 CFG scale (default 6.5)")
    g.add_argument("--migc-steps", type=int, default=None,
                   help="stage-1 steps with the layout adapter on (default 16)")
    g.add_argument("--stage1-size", type=_size_arg, default=None, metavar="WxH",
                   help="stage-1 generation size, stretched to the layout size after (default 512)")
    g.add_argument("--stage1-seed", type=int, default=None, help="stage-1 seed (default: --seed)")
    g.add_argument("--stage1-negative", default=None, metavar="TEXT",
                   help="stage-1 negative prompt (default: the authors' demos' 'worst quality, low quality, ...')")
    g.add_argument("--no-phase-augment", action="store_true",
                   help="do not repeat instance phrases for stage 1 (the authors' phase augmentation)")
    g.add_argument("--sam", nargs="?", const=_SAM_DEFAULT, default=None, metavar="PATH_OR_ID",
                   help="tighten instance regions with SAM2 masks of the boxes on the depth map "
                        "(default model facebook/sam2.1-hiera-large)")


def _demo_help(p: argparse.ArgumentParser) -> None:
    """The demo's own defaults in its --help: the tiny checkpoints run at other sizes than `render`."""
    helps = {
        "steps": f"denoising steps (default {_TINY_STEPS} on the tiny checkpoint, 20 with --model)",
        "stage1_steps": f"stage-1 steps (default {_TINY_STAGE1_STEPS} on the tiny checkpoint, 30 with --model)",
        "migc_steps": f"stage-1 steps with the layout adapter on (default {_TINY_MIGC_STEPS} on the tiny "
                      "checkpoint, 16 with --model)",
        "stage1_size": f"stage-1 generation size, stretched to the layout size after (default "
                       f"{_TINY_STAGE1_SIZE} on the tiny checkpoint, 512 with --model)",
        "sam": "tighten instance regions with SAM2 masks (default: on with the tiny SAM2 checkpoint without "
               "--model, off with --model unless given; model facebook/sam2.1-hiera-large)",
    }
    for action in p._actions:
        if action.dest in helps:
            action.help = helps[action.dest]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threedis", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("render", help="render a layout (stage 1 -> optional SAM2 -> FLUX)",
                       description="Render LAYOUT (JSON) into an output folder. Without --depth, stage 1 "
                                   "makes the depth map from the layout.")
    p.add_argument("layout", type=Path, nargs="?", help="layout JSON file (not with --from)")
    p.add_argument("--from", dest="from_png", type=Path, default=None, metavar="IMAGE.png",
                   help="render again an image written by threedis: layout, seed, settings, model and LoRAs come "
                        "from its metadata, the depth map from the depth file saved beside it (or --depth); "
                        "--model / --depth / --device / --profile / --set / --backend / --lora still apply; "
                        "the models it names are loaded offline unless --allow-downloads")
    p.add_argument("--allow-downloads", action="store_true",
                   help="with --from: let the model, stage-1 and SAM ids in the image's metadata be downloaded")
    p.add_argument("--model", default=os.environ.get("THREEDIS_MODEL"),
                   help="FLUX.1-Depth-dev: local diffusers folder or hub id (or $THREEDIS_MODEL)")
    p.add_argument("--out", type=Path, default=Path("threedis-out"), help="output folder (default threedis-out)")
    _add_depth_options(p, "stage-1 model: an LDM3D-4c folder holding unet_0901.ckpt and layout_adapter.ckpt, or "
                          "a hub id (default: the authors' release, or $THREEDIS_STAGE1)")
    _add_render_options(p)

    p = sub.add_parser("demo", help="render an example layout end to end (tiny checkpoint if no weights)",
                       description="Render a shipped example layout. Without --model it uses tiny "
                                   "random-weight checkpoints (FLUX, stage 1, SAM2) at sizes that take seconds "
                                   f"on a CPU: the layout shrunk to <= {_TINY_MAX_SIDE} px, {_TINY_STEPS} steps, "
                                   f"stage 1 at {_TINY_STAGE1_SIZE}x{_TINY_STAGE1_SIZE} for {_TINY_STAGE1_STEPS} "
                                   "steps, SAM2 on; the picture is noise-like, but every stage runs. With --model "
                                   "it renders like `threedis render`.")
    p.add_argument("--example", default="two_birds", help="example layout name (see `threedis validate --list`)")
    p.add_argument("--model", default=os.environ.get("THREEDIS_MODEL"),
                   help="real FLUX.1-Depth-dev folder or hub id (default: the tiny checkpoint)")
    p.add_argument("--out", type=Path, default=Path("threedis-out/demo"), help="output folder")
    _add_depth_options(p, "stage-1 model (default: the tiny checkpoint without --model, else the authors' "
                          "release or $THREEDIS_STAGE1)")
    p.add_argument("--no-sam", action="store_true", help="tiny demo: skip SAM2 (on by default there)")
    _add_render_options(p)
    p.set_defaults(steps=None)
    _demo_help(p)

    from threedis.engine.batch.command import add_batch_parser

    add_batch_parser(sub)

    p = sub.add_parser("depth", help="estimate a depth map from a photo (Depth Anything V2)",
                       description="Write the depth map of PHOTO (grey, near = bright), as used by --depth.")
    p.add_argument("photo", type=Path, help="photo (PNG/JPEG)")
    p.add_argument("--out", type=Path, default=Path("depth.png"), help="depth image to write (default depth.png)")
    p.add_argument("--model", default=os.environ.get("THREEDIS_DEPTH_MODEL"), metavar="PATH_OR_ID",
                   help="Depth Anything V2 folder or hub id (default depth-anything/Depth-Anything-V2-Large-hf "
                        "or $THREEDIS_DEPTH_MODEL)")
    p.add_argument("--size", type=_size_arg, default=None, metavar="WxH", help="output size (default: the photo's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--local-files-only", action="store_true", help="never try to download weights")

    p = sub.add_parser("convert-weights", help="write safetensors copies of the stage-1 .ckpt pickles (once)",
                       description="Read unet_0901.ckpt / layout_adapter.ckpt (weights only, no code runs) and "
                                   "write a .safetensors copy beside each; stage 1 loads the copy from then on.")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                   help="a .ckpt file, or a folder holding the authors' unet_0901.ckpt and layout_adapter.ckpt")
    p.add_argument("--overwrite", action="store_true", help="replace existing .safetensors copies")

    p = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint (flux, ldm3d, sam2, depth or all)",
                       description="Write a tiny random-weight checkpoint in the real model's on-disk layout, for "
                                   "tests and trying the commands without the real weights: flux (FLUX.1-Depth-dev, "
                                   "for --model), ldm3d (stage 1, for --stage1), sam2 (for --sam), depth (Depth "
                                   "Anything V2, for --depth-model), or all (one subfolder each). "
                                   "`threedis make-tiny PATH` alone writes flux.",
                       epilog="example: threedis make-tiny ldm3d ~/tiny/ldm3d, then "
                              "threedis render layout.json --model ... --stage1 ~/tiny/ldm3d")
    p.add_argument("kind_or_path", metavar="KIND", help="flux, ldm3d, sam2, depth or all (given alone: the PATH "
                                                        "of a flux checkpoint)")
    p.add_argument("path", type=Path, nargs="?", metavar="PATH",
                   help="folder to write: new or empty, not a system folder, not named like the real model")
    p.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same bytes)")

    p = sub.add_parser("validate", help="check layout files and explain any problem")
    p.add_argument("layouts", type=Path, nargs="*", help="layout JSON files (or .jsonl batch job files)")
    p.add_argument("--list", action="store_true", help="list the shipped example layouts")

    p = sub.add_parser("plan", help="predict peak VRAM and RAM per stage before loading anything")
    p.add_argument("layout", type=Path, help="layout JSON file (size and instance count are used)")
    p.add_argument("--profile", default="12gb", help="profile name or TOML file (default 12gb)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--chunk", type=int, default=200)
    p.add_argument("--stage1", action="store_true", help="include stage 1 (layout -> depth: render without --depth)")
    p.add_argument("--stage1-size", type=_size_arg, default=(512, 512), metavar="WxH",
                   help="stage-1 generation size, 512 or 768x512 (default 512)")
    p.add_argument("--sam", action="store_true", help="include SAM2 mask enhancement")
    p.add_argument("--depth-from-photo", action="store_true", help="include the Depth Anything estimator")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("profiles", help="list the built-in memory profiles, or show one resolved")
    p.add_argument("--show", metavar="PROFILE", help="print every key of a profile (name or TOML file), "
                                                     "defaults filled in")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --show: change a key first")

    p = sub.add_parser("serve", help="local HTTP service + web layout editor (needs threedis-flux[serve])",
                       description="Serve the engine on 127.0.0.1: a JSON/WebSocket API under /api/v1 (docs/api.md, "
                                   "/docs) and a web layout editor at /. Without --model: the tiny checkpoints.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--model", default=os.environ.get("THREEDIS_MODEL"),
                   help="FLUX.1-Depth-dev folder or hub id (default: the tiny checkpoints, or $THREEDIS_MODEL)")
    p.add_argument("--profile", default="auto", help="memory profile name or TOML file (default: auto)")
    p.add_argument("--stage1", default=os.environ.get("THREEDIS_STAGE1"), metavar="PATH_OR_ID",
                   help="stage-1 model (default: the tiny one without --model, else the authors' release)")
    p.add_argument("--sam", default=None, metavar="PATH_OR_ID", help="SAM2 model for jobs with sam: true")
    p.add_argument("--depth-model", default=os.environ.get("THREEDIS_DEPTH_MODEL"), metavar="PATH_OR_ID",
                   help="Depth Anything V2 model for depth from a photo")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--local-files-only", action="store_true", help="never try to download weights")
    p.add_argument("--out", type=Path, default=Path("threedis-out/serve"),
                   help="outputs and history.sqlite3 (default threedis-out/serve)")
    p.add_argument("--open", action="store_true", help="open the editor in the default browser")
    p.add_argument("--no-auth", action="store_true", help="no bearer token (only with a loopback --host)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept browser requests from this origin, e.g. http://localhost:3000 (repeatable)")
    p.add_argument("--max-upload-mb", type=float, default=32, help="largest upload in MiB (default 32)")
    p.add_argument("--max-upload-pixels", type=int, default=4096 * 4096,
                   help="largest upload in pixels (default 4096*4096)")

    p = sub.add_parser("bench", help="run a benchmark (attention)")
    p.add_argument("what", choices=["attention"], help="which benchmark")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    return parser


# ---------------------------------------------------------------- helpers


def _parse_overrides(items: Sequence[str]) -> dict[str, str]:
    from threedis.engine.profiles import parse_overrides

    return parse_overrides(items)


def _schedule(args: argparse.Namespace, steps: int):
    from threedis.kernels.rule import Schedule

    def pick(value: int | None) -> int:
        return steps if value is None else value

    i2i = min(4, steps) if args.i2i is None else args.i2i  # the demos' 4 (api.DEMO_I2I_STEPS)
    return Schedule(steps=steps, hard=pick(args.hard), i2i=i2i, i2t=pick(args.i2t),
                    t2i=pick(args.t2i), t2t=pick(args.t2t))


class _ProgressBar:
    """tqdm bar fed by the engine's on_step callback."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None

    def __call__(self, step: int, total: int, preview=None) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="step", file=sys.stderr)
        self.bar.update(1)
        if step >= total:  # finished: close now so the next stage's bar starts on its own line
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _stage1_options(args: argparse.Namespace, steps: int, migc_steps: int, size: int | tuple[int, int]) -> Any:
    """Stage-1 settings for Engine.render: the command's values, else the given defaults."""
    from threedis.engine.api import Stage1Options

    return Stage1Options(
        steps=args.stage1_steps if args.stage1_steps is not None else steps,
        migc_steps=args.migc_steps if args.migc_steps is not None else migc_steps,
        size=args.stage1_size if args.stage1_size is not None else size,
        guidance=args.stage1_guidance,
        seed=args.stage1_seed,
        phase_augment=not args.no_phase_augment,
        negative_prompt=args.stage1_negative,
    )


def _check_depth_inputs(args: argparse.Namespace) -> None:
    for flag, path in (("--depth", args.depth), ("--depth-from-photo", args.depth_from_photo)):
        if path is not None and not path.is_file():
            raise UserError(f"{flag}: file not found: {path}")


def _render(args: argparse.Namespace, layout, model: str, steps: int, stage1: str | None, sam: str | None,
            stage1_options: Any) -> int:
    """Load the engine, get the depth (file, photo or stage 1), render, save, print the report."""
    from threedis.engine.api import Engine, RenderOptions
    from threedis.engine.checks import check_render_args
    from threedis.engine.outputs import check_output_folder

    _check_depth_inputs(args)
    schedule = _schedule(args, steps)
    check_render_args(steps=steps, seed=args.seed, guidance=args.guidance, schedule=schedule,
                      chunk=args.chunk)  # before anything loads (stage 1's settings were checked when made)
    check_output_folder(args.out)  # a full or read-only folder is found now, not after the render
    overrides = _parse_overrides(args.overrides)
    engine = Engine.from_pretrained(
        model, profile=args.profile, overrides=overrides or None, device=args.device,
        local_files_only=args.local_files_only, backend=args.backend, stage1=stage1,
        sam=None if sam in (None, _SAM_DEFAULT) else sam, depth_estimator=args.depth_model,
    )
    print(f"profile {engine.profile.name} ({engine.profile.origin or 'built-in'}); "
          f"attention backend {engine.backend} ({engine.backend_reason})")
    if args.lora:
        engine.load_lora(args.lora, scale=args.lora_scale)
    if args.depth_from_photo is not None:
        print(f"estimating the depth map of {args.depth_from_photo}")
    options = RenderOptions(chunk=args.chunk, append_instances=not args.no_append_instances,
                            permute_tokens=args.permute_tokens)
    result = _render_with_progress(
        engine, layout=layout, depth=args.depth, depth_from_photo=args.depth_from_photo, seed=args.seed,
        steps=steps, guidance=args.guidance, schedule=schedule, sam=sam is not None,
        stage1=stage1_options, options=options,
    )
    _save_and_report(result, args.out, f"wrote to {args.out}:")
    return 0


def _render_with_progress(engine: Any, **render_kwargs: Any) -> Any:
    """engine.render with terminal progress bars; Ctrl-C cancels at the next step and frees memory."""
    cancel = threading.Event()
    bar1, bar2 = _ProgressBar("stage 1 (layout -> depth)"), _ProgressBar("denoising")
    try:
        return engine.render(on_step=bar2, cancel=cancel, on_stage1_step=bar1, **render_kwargs)
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        bar1.close()
        bar2.close()


def _save_and_report(result: Any, out: Path, heading: str) -> None:
    """Write the render's files as one set (never overwriting); print the profile and the paths."""
    from threedis.engine.report import Report

    paths = result.save(out, pictures=True)
    print(Report.load(paths["report"]).table())  # the saved report: it has the "save" row too
    print(f"\n{heading}")
    for kind, path in paths.items():
        print(f"  {kind:<12} {path}")


# ---------------------------------------------------------------- commands


# With --from, these may still be given: where things are and how to run, not what to render.
_FROM_ALLOWED = {"command", "layout", "from_png", "model", "out", "depth", "device", "local_files_only", "profile",
                 "allow_downloads", "lora", "lora_scale",
                 "overrides", "backend"}


def _rerender(args: argparse.Namespace) -> int:
    """`render --from IMAGE.png`: the same render again from the image's metadata and the files beside it."""
    from threedis.engine.api import Engine
    from threedis.engine.outputs import check_output_folder, rerender_from_png

    if args.layout is not None:
        raise UserError("give either a layout file or --from IMAGE.png, not both")
    defaults = vars(build_parser().parse_args(["render", "--from", str(args.from_png)]))
    changed = sorted(k for k, v in vars(args).items() if k not in _FROM_ALLOWED and v != defaults.get(k))
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise UserError(f"--from takes the render settings from the image; drop {flags} (or render the layout)")
    _check_depth_inputs(args)
    check_output_folder(args.out)
    plan = rerender_from_png(args.from_png, depth=args.depth, replace_loras=bool(args.lora))
    engine_kwargs = dict(plan.engine)
    recorded = engine_kwargs.pop("path_or_id")
    model = args.model if args.model != defaults["model"] or recorded in (None, "in-memory") else recorded
    if not model:
        raise UserError(f"{args.from_png} was rendered from models built in memory; pass --model")
    if args.profile != "auto":
        engine_kwargs["profile"] = args.profile
    engine_kwargs["overrides"] = {**engine_kwargs["overrides"], **_parse_overrides(args.overrides)}
    if args.backend != "auto":
        engine_kwargs["backend"] = args.backend
    # The model, stage-1 and SAM ids come from a file that may not be the user's: offline unless allowed.
    offline = args.local_files_only or not args.allow_downloads
    with _offline_hint(offline):
        engine = Engine.from_pretrained(model, device=args.device, local_files_only=offline, **engine_kwargs)
        loras = [(str(args.lora), args.lora_scale)] if args.lora else plan.loras
        for path, scale in loras:
            engine.load_lora(path, scale=scale)
        result = _render_with_progress(engine, **plan.render)
    result.settings["rerendered_from"] = str(args.from_png.resolve())
    _save_and_report(result, args.out, f"rendered {args.from_png} again; wrote to {args.out}:")
    return 0


@contextlib.contextmanager
def _offline_hint(offline: bool) -> Iterator[None]:
    """A model missing locally during `render --from`: say how to allow the download."""
    try:
        yield
    except UserError as err:
        if not offline or "--allow-downloads" in str(err):
            raise
        raise UserError(f"{err} (render --from loads the models named in the image offline; pass "
                        f"--allow-downloads to let it download them)") from None


def cmd_render(args: argparse.Namespace) -> int:
    from threedis.engine.layout import Layout

    if args.from_png is not None:
        return _rerender(args)
    if args.layout is None:
        raise UserError("give a layout file (threedis render layout.json ...) or --from IMAGE.png")
    layout = Layout.load(args.layout)
    if not args.model:
        raise UserError("no model given: pass --model with a FLUX.1-Depth-dev folder or hub id "
                        "(or set $THREEDIS_MODEL); `threedis demo` runs on a tiny test checkpoint")
    return _render(args, layout, args.model, args.steps, args.stage1 or "auto", args.sam,
                   _stage1_options(args, steps=30, migc_steps=16, size=512))




def cmd_demo(args: argparse.Namespace) -> int:
    from threedis.engine.layout import Layout, example_path

    layout = Layout.load(example_path(args.example))
    if args.model:
        model, steps, sam = args.model, args.steps or 20, args.sam
        stage1 = args.stage1 or "auto"
        stage1_options = _stage1_options(args, steps=30, migc_steps=16, size=512)
    else:
        from threedis.engine.tiny.flux import tiny_flux_path
        from threedis.engine.tiny.ldm3d import tiny_ldm3d_path
        from threedis.engine.tiny.sam2 import tiny_sam2_path

        model, steps = str(tiny_flux_path()), args.steps or _TINY_STEPS
        layout = _shrink_for_tiny(layout)
        print(f"no --model given: using the tiny random-weight checkpoint at {model}")
        stage1 = args.stage1
        if stage1 is None and args.depth is None and args.depth_from_photo is None:
            stage1 = str(tiny_ldm3d_path())
            print(f"stage 1: tiny random-weight LDM3D checkpoint at {stage1}")
        if args.depth_from_photo is not None and args.depth_model is None:
            from threedis.engine.tiny.depth import tiny_depth_anything_path

            args.depth_model = str(tiny_depth_anything_path())
            print(f"depth estimator: tiny random-weight Depth Anything at {args.depth_model}")
        sam = args.sam
        if sam is None and not args.no_sam:
            sam = str(tiny_sam2_path())
            print(f"SAM2: tiny random-weight checkpoint at {sam}")
        stage1_options = _stage1_options(args, steps=_TINY_STAGE1_STEPS, migc_steps=_TINY_MIGC_STEPS,
                                         size=_TINY_STAGE1_SIZE)
    if args.no_sam:
        sam = None
    return _render(args, layout, model, steps, stage1, sam, stage1_options)


def _shrink_for_tiny(layout):
    """Same layout at <= _TINY_MAX_SIDE px on the long side (multiple of 16), so the demo runs in seconds on CPU."""
    scale = min(1.0, _TINY_MAX_SIDE / max(layout.width, layout.height))
    width = max(16, int(layout.width * scale) // 16 * 16)
    height = max(16, int(layout.height * scale) // 16 * 16)
    return replace(layout, width=width, height=height)


def cmd_depth(args: argparse.Namespace) -> int:
    from threedis.engine.depth_estimation import DEFAULT_DEPTH_MODEL, DepthEstimator, open_image
    from threedis.engine.outputs import save_image_new

    if args.out.exists() and not args.overwrite:  # before loading anything
        raise UserError(f"{args.out} already exists; choose another --out or pass --overwrite")
    photo = open_image(args.photo, "photo")
    estimator = DepthEstimator.from_pretrained(args.model or DEFAULT_DEPTH_MODEL, device=args.device,
                                               local_files_only=args.local_files_only)
    depth = estimator.estimate(photo, args.size)
    path = save_image_new(depth, args.out, overwrite=args.overwrite)
    print(f"wrote {depth.size[0]}x{depth.size[1]} depth map to {path}")
    return 0


def cmd_convert_weights(args: argparse.Namespace) -> int:
    from threedis.engine.stage1.checkpoint import convert_release_files

    for path in args.paths:
        for out, written in convert_release_files(path, overwrite=args.overwrite):
            print(f"wrote {out}" if written else f"{out} exists, kept (--overwrite replaces it)")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from threedis.engine.tiny import KINDS, write_tiny

    kinds = (*KINDS, "all")
    if args.path is None:  # `threedis make-tiny PATH`: flux, as before kinds existed
        if args.kind_or_path in kinds:
            raise UserError(f"give the folder to write: threedis make-tiny {args.kind_or_path} PATH")
        kind, path = "flux", Path(args.kind_or_path)
    else:
        kind, path = args.kind_or_path, args.path
        if kind not in kinds:
            raise UserError(f"unknown tiny checkpoint kind {kind!r}: use one of {', '.join(kinds)}")
    for name, folder in write_tiny(kind, path, seed=args.seed):
        print(f"wrote tiny {KINDS[name].what} checkpoint to {folder} (pass it as {KINDS[name].option} {folder})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    if args.list:
        for name in list_examples():
            print(name)
        return 0
    if not args.layouts:
        raise UserError("give one or more layout files, or --list for the shipped examples")
    failed = 0
    for path in args.layouts:
        if path.suffix == ".jsonl":  # a batch job file: each bad line by number
            from threedis.engine.batch.jobs import validate_jobs_file  # imports torch: only for job files

            failed += not validate_jobs_file(path)
            continue
        try:
            layout = Layout.load(path)
        except LayoutError as err:
            failed += 1
            if len(err.problems) == 1:
                print(f"{path}: INVALID: {err}")
            else:  # one line per problem, so a file can be fixed in one go
                print(f"{path}: INVALID ({len(err.problems)} problems):")
                for problem in err.problems:
                    print(f"  {problem}")
            continue
        print(f"{path}: ok ({layout.width}x{layout.height}, {len(layout.instances)} instances)")
    return EXIT_USER_ERROR if failed else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from threedis.engine.planner import models_for, plan  # imports torch

    layout = Layout.load(args.layout)
    profile = load_profile(args.profile, _parse_overrides(args.overrides) or None)
    models = models_for(stage1=args.stage1, sam2=args.sam, depth_estimator=args.depth_from_photo)
    result = plan(profile, layout.width, layout.height, len(layout.instances), chunk=args.chunk, models=models,
                  stage1_size=args.stage1_size)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    if args.show:
        print(resolved_toml(load_profile(args.show, _parse_overrides(args.overrides) or None)), end="")
        return 0
    if args.overrides:
        raise UserError("--set changes a profile shown with --show PROFILE; add --show")
    for name in list_profiles():
        profile = load_profile(name)
        print(f"{name:<8} {profile.description}")
    print("auto     picks the largest profile that fits the free VRAM (cpu without CUDA)")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from threedis.engine.batch.command import cmd_batch as run

    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from threedis.engine.serve.server import config_from_args, require_dependencies, serve

    require_dependencies()
    serve(config_from_args(args), open_browser=args.open)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from threedis.kernels.bench_attention import main as bench_main  # imports torch

    return bench_main(args.bench_args)


COMMANDS = {
    "render": cmd_render,
    "demo": cmd_demo,
    "batch": cmd_batch,
    "depth": cmd_depth,
    "convert-weights": cmd_convert_weights,
    "make-tiny": cmd_make_tiny,
    "validate": cmd_validate,
    "plan": cmd_plan,
    "profiles": cmd_profiles,
    "serve": cmd_serve,
    "bench": cmd_bench,
}


def _print_threedis_warnings() -> Any:
    """A warnings.showwarning that prints a ThreedisWarning as one `threedis: warning: ...` line."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if issubclass(category, ThreedisWarning):
            print(f"threedis: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # the CLI owns its process: every threedis warning is shown, one line each
        warnings.showwarning = _print_threedis_warnings()
        warnings.simplefilter("always", ThreedisWarning)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from threedis.engine.interrupts import Terminated, terminate_like_interrupt

    try:
        with terminate_like_interrupt():  # SIGTERM cleans up as Ctrl-C does: no partial outputs, no temp folders
            if getattr(args, "device", None) is not None:
                from threedis.engine.checks import parse_device

                args.device = parse_device(args.device)
            return COMMANDS[args.command](args)
    except _user_errors() as err:
        print(f"threedis: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated:
        print("threedis: terminated (SIGTERM); nothing partial was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("threedis: interrupted; nothing partial was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `threedis profiles | head -1`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        return 0


if __name__ == "__main__":
    sys.exit(main())
