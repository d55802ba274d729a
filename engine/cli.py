"""`threedis` command line: render, demo, batch, eval, serve, depth, convert-weights, make-tiny, validate, plan,
profiles, bench.
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

from threedis.engine import tiny_rules
from threedis.engine.cli_args import SAM_DEFAULT, add_lora_argument, add_sam_argument, loras, sam_spec
from threedis.engine.errors import ThreedisWarning, UserError
from threedis.engine.layout import Layout, LayoutError, list_examples
from threedis.engine.profiles import list_profiles, load_profile, resolved_toml

EXIT_USER_ERROR = 2
EXIT_PLAN_DOES_NOT_FIT = 3  # `threedis plan`: the plan was made, and it exceeds the profile's VRAM or this RAM

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
  threedis eval mig runs/mig                     # COCO-MIG scores of a batch run (docs/eval.md)
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
    g.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default 20; {tiny_rules.STEPS} on a tiny random-weight FLUX checkpoint)")
    g.add_argument("--guidance", type=float, default=10.0, help="distilled guidance scale (default 10.0)")
    g.add_argument("--chunk", type=int, default=200, help="T5 tokens kept per prompt (default 200)")
    g.add_argument("--hard", type=int, default=None,
                   help="hard-control steps: masked attention for s < HARD (default: all)")
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
    add_lora_argument(r, old_scale_flag=True)
    r.add_argument("--local-files-only", action="store_true", help="never try to download weights")


_TINY_STAGE1 = "on a tiny random-weight stage-1 checkpoint"


def _size_arg(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> (768, 512) (width x height): the API's reading (sizes.parse_size).

    argparse names the flag before the message ("argument --size: the size must be ..."), so the
    message names no option of its own: the same type serves --stage1-size and depth's --size.
    """
    from threedis.engine.sizes import parse_size

    try:
        return parse_size(text, "the size")
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
    g.add_argument("--stage1-steps", type=int, default=None,
                   help=f"stage-1 steps (default 30; {tiny_rules.STAGE1_STEPS} {_TINY_STAGE1})")
    g.add_argument("--stage1-guidance", type=float, default=6.5, help="stage-1 CFG scale (default 6.5)")
    g.add_argument("--migc-steps", type=int, default=None,
                   help=f"stage-1 steps with the layout adapter on (default 16; {tiny_rules.MIGC_STEPS} "
                        f"{_TINY_STAGE1})")
    g.add_argument("--refine-steps", type=int, default=None, metavar="N",
                   help="stage-1 steps with the refined shader on where the adapter is off (default: every step; "
                        "0 = off; the authors' NaiveFuserSteps + 1)")
    g.add_argument("--stage1-size", type=_size_arg, default=None, metavar="WxH",
                   help=f"stage-1 generation size, stretched to the layout size after (default 512; "
                        f"{tiny_rules.STAGE1_SIZE} {_TINY_STAGE1})")
    g.add_argument("--stage1-seed", type=int, default=None, help="stage-1 seed (default: --seed)")
    g.add_argument("--stage1-negative", default=None, metavar="TEXT",
                   help="stage-1 negative prompt (default: the authors' demos' 'worst quality, low quality, ...')")
    g.add_argument("--no-phase-augment", action="store_true",
                   help="do not repeat instance phrases for stage 1 (the authors' phase augmentation)")
    add_sam_argument(g, "tighten instance regions with SAM2 masks of the boxes on the depth map "
                        "(model: PATH_OR_ID, or facebook/sam2.1-hiera-large without one)")


def _demo_help(p: argparse.ArgumentParser) -> None:
    """The demo's own SAM help: off unless asked, since the tiny SAM2's masks are random."""
    for action in p._actions:
        if action.dest == "sam":
            action.help = ("tighten instance regions with SAM2 masks (off unless given; without --model, a bare --sam "
                           "uses the tiny random-weight SAM2, whose masks are random shapes)")


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
                                   "random-weight checkpoints (FLUX and stage 1) at sizes that take seconds "
                                   f"on a CPU: the layout shrunk to <= {tiny_rules.DEMO_MAX_SIDE} px, "
                                   f"{tiny_rules.STEPS} steps, stage 1 at {tiny_rules.STAGE1_SIZE}x"
                                   f"{tiny_rules.STAGE1_SIZE} for {tiny_rules.STAGE1_STEPS} steps; the picture is "
                                   "noise-like, but every stage runs. SAM2 runs only with --sam (the tiny SAM2's "
                                   "masks are random shapes). With --model it renders like `threedis render`.")
    p.add_argument("--example", default="two_birds", help="example layout name (see `threedis validate --list`)")
    p.add_argument("--model", default=os.environ.get("THREEDIS_MODEL"),
                   help="real FLUX.1-Depth-dev folder or hub id (default: the tiny checkpoint)")
    p.add_argument("--out", type=Path, default=Path("threedis-out/demo"), help="output folder")
    _add_depth_options(p, "stage-1 model (default: the tiny checkpoint without --model, else the authors' "
                          "release or $THREEDIS_STAGE1)")
    p.add_argument("--no-sam", action="store_true", help=argparse.SUPPRESS)  # SAM2 is off by default now
    _add_render_options(p)
    _demo_help(p)

    from threedis.engine.batch.command import add_batch_parser

    add_batch_parser(sub)

    from threedis.engine.eval.command import add_eval_parser

    add_eval_parser(sub)

    p = sub.add_parser("depth", help="estimate a depth map from a photo (Depth Anything V2)",
                       description="Write the depth map of PHOTO (grey, near = bright), as used by --depth.")
    p.add_argument("photo", type=Path, help="photo (PNG/JPEG)")
    p.add_argument("--out", type=Path, default=Path("depth.png"), help="depth image to write (default depth.png)")
    p.add_argument("--depth-model", "--model", dest="model", default=os.environ.get("THREEDIS_DEPTH_MODEL"),
                   metavar="PATH_OR_ID", help="Depth Anything V2 folder or hub id, as for render's --depth-model "
                                              "(default depth-anything/Depth-Anything-V2-Large-hf or "
                                              "$THREEDIS_DEPTH_MODEL)")
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

    p = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint (flux, ldm3d, sam2, depth, "
                                         "grounding-dino, sam-vit or all)",
                       description="Write a tiny random-weight checkpoint in the real model's on-disk layout, for "
                                   "tests and trying the commands without the real weights: flux (FLUX.1-Depth-dev, "
                                   "for --model), ldm3d (stage 1, for --stage1), sam2 (for --sam), depth (Depth "
                                   "Anything V2, for --depth-model), grounding-dino and sam-vit (the COCO-MIG "
                                   "evaluation's models, for `eval mig --detector / --sam`), or all (one subfolder "
                                   "each). `threedis make-tiny PATH` alone writes flux.",
                       epilog="example: threedis make-tiny ldm3d ~/tiny/ldm3d, then "
                              "threedis render layout.json --model ... --stage1 ~/tiny/ldm3d")
    p.add_argument("kind_or_path", metavar="KIND", help="flux, ldm3d, sam2, depth, grounding-dino, sam-vit or all "
                                                        "(given alone: the PATH "
                                                        "of a flux checkpoint)")
    p.add_argument("path", type=Path, nargs="?", metavar="PATH",
                   help="folder to write: new or empty, not a system folder, not named like the real model")
    p.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same bytes)")

    p = sub.add_parser("validate", help="check layout files and explain any problem",
                       description="Check layout files (and batch job files, .jsonl) without loading anything: "
                                   "each problem on a line of its own. Exit 0 when every file is fine, 2 otherwise.")
    p.add_argument("layouts", type=Path, nargs="*", help="layout JSON files (or .jsonl batch job files)")
    p.add_argument("--list", action="store_true", help="list the shipped example layouts")

    p = sub.add_parser("plan", help="predict peak VRAM and RAM per stage before loading anything",
                       description="Predict the peak GPU memory and host RAM of each stage of a render of LAYOUT "
                                   "with a profile, from exact parameter counts, before anything is downloaded. "
                                   "The flags read as render's: --stage1, --sam and --depth-from-photo add those "
                                   "stages (a local model folder given to them is priced as it is). Exit 0 when the "
                                   f"plan fits, {EXIT_PLAN_DOES_NOT_FIT} when it exceeds the profile's VRAM "
                                   f"budget or this machine's RAM (the plan is still printed), {EXIT_USER_ERROR} "
                                   "for a usage error.")
    p.add_argument("layout", type=Path, help="layout JSON file (size and instance count are used)")
    p.add_argument("--profile", default="auto",
                   help="memory profile name or TOML file (default: auto, the one a render here would pick)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile key, e.g. --set transformer.weights=nf4 (repeatable)")
    p.add_argument("--chunk", type=int, default=200, help="T5 tokens kept per prompt (default 200)")
    p.add_argument("--stage1", nargs="?", const="auto", default=None, metavar="PATH_OR_ID",
                   help="include stage 1 (render without --depth), with its model if given")
    p.add_argument("--stage1-size", type=_size_arg, default=None, metavar="WxH",
                   help=f"stage-1 generation size, 512 or 768x512 (default 512; {tiny_rules.STAGE1_SIZE} "
                        f"{_TINY_STAGE1})")
    add_sam_argument(p, "include SAM2 mask enhancement, with its model if given")
    p.add_argument("--depth-from-photo", nargs="?", const="photo", default=None, metavar="PHOTO",
                   help="include the Depth Anything estimator (the photo itself is not read)")
    p.add_argument("--depth-model", default=os.environ.get("THREEDIS_DEPTH_MODEL"), metavar="PATH_OR_ID",
                   help="the estimator for --depth-from-photo (default: Depth-Anything-V2-Large)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("profiles", help="list the built-in memory profiles, or show one resolved",
                       description="List the built-in memory profiles (where each model runs, in which weight "
                                   "format, offloaded or not), or print every key of one with --show.")
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
                   help="stage-1 model (default: the tiny one without --model, else the authors' release or "
                        "$THREEDIS_STAGE1)")
    add_sam_argument(p, "SAM2 model for jobs with sam: true (default, and a bare --sam: "
                        "facebook/sam2.1-hiera-large; the tiny one without --model)")
    p.add_argument("--depth-model", default=os.environ.get("THREEDIS_DEPTH_MODEL"), metavar="PATH_OR_ID",
                   help="Depth Anything V2 model for depth from a photo (default "
                        "depth-anything/Depth-Anything-V2-Large-hf or $THREEDIS_DEPTH_MODEL)")
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
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="folder of .safetensors LoRAs that jobs may name (jobs never give paths)")
    p.add_argument("--max-lora-mb", type=float, default=2048, help="largest LoRA upload in MiB (default 2048)")

    p = sub.add_parser("bench", help="run a benchmark (attention)",
                       description="Run a benchmark; `threedis bench attention --help` lists its options.")
    p.add_argument("what", choices=["attention"], help="which benchmark")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    return parser


# ---------------------------------------------------------------- helpers


def _parse_device(args: argparse.Namespace) -> None:
    """--device as a torch.device this machine has (imports torch; None stays the engine's default)."""
    if args.device is not None:
        from threedis.engine.checks import parse_device

        args.device = parse_device(args.device)


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


def _stage1_options(args: argparse.Namespace, stage1: str | None) -> Any:
    """Stage-1 settings for Engine.render: the command's values, else the model's defaults (stages.default_stage1)."""
    from threedis.engine.stages import default_stage1

    given = {"steps": args.stage1_steps, "migc_steps": args.migc_steps, "size": args.stage1_size}
    return replace(default_stage1(stage1), **{k: v for k, v in given.items() if v is not None},
                   guidance=args.stage1_guidance, seed=args.stage1_seed, phase_augment=not args.no_phase_augment,
                   negative_prompt=args.stage1_negative, refine_steps=args.refine_steps)


def _loras(args: argparse.Namespace) -> list[tuple[str, float]]:
    """--lora PATH[:SCALE] (repeatable); the old --lora-scale still sets the scale, with a warning."""
    if args.lora_scale is not None:
        warnings.warn("--lora-scale is deprecated: write --lora PATH:SCALE", ThreedisWarning, stacklevel=2)
    return loras(args.lora, args.lora_scale)


def _check_before_torch(args: argparse.Namespace, model: str | None, stage1: str | None, sam: str | None) -> None:
    """What a render can be refused for without a model or torch, said before either is loaded (the output
    folder is checked here but made only once every argument is checked, in _render).

    model / stage1 / sam: those the user named (None: a tiny one comes later). The engine
    checks all of it again; here it only comes seconds, or tens of seconds, sooner.
    """
    from threedis.engine.checks import check_render_args
    from threedis.engine.paths import check_folder_could_be_made
    from threedis.engine.preflight import check_files, check_models, check_profile

    stage1_runs = args.depth is None and args.depth_from_photo is None
    check_files({"--depth": args.depth, "--depth-from-photo": args.depth_from_photo})
    check_models(model=model, stage1=stage1 if stage1_runs else None, sam=sam,
                 depth_model=args.depth_model if args.depth_from_photo is not None else None,
                 loras=[path for path, _ in args.lora])
    check_render_args(steps=tiny_rules.steps_for(model, args.steps), seed=args.seed, guidance=args.guidance,
                      chunk=args.chunk)
    check_profile(args.profile, _parse_overrides(args.overrides), args.device)
    check_folder_could_be_made(args.out, "output folder", "choose another --out")


def _render(args: argparse.Namespace, layout, model: str, stage1: str | None, sam: str | None) -> int:
    """Load the engine, get the depth (file, photo or stage 1), render, save, print the report.

    sam: the SAM2 model when SAM is on (SAM_DEFAULT: the engine's default model), None when off.
    """
    from threedis.engine.checks import check_schedule, parse_device
    from threedis.engine.outputs import check_output_folder

    args.device = parse_device(args.device)  # torch from here on
    from threedis.engine.api import Engine, RenderOptions

    steps = tiny_rules.steps_for(model, args.steps)
    schedule = _schedule(args, steps)
    check_schedule(schedule, steps)
    stage1_options = _stage1_options(args, stage1) if args.depth is None and args.depth_from_photo is None else None
    check_output_folder(args.out)  # made now that every argument is checked; a full or read-only one is found now
    overrides = _parse_overrides(args.overrides)
    engine = Engine.from_pretrained(
        model, profile=args.profile, overrides=overrides or None, device=args.device,
        local_files_only=args.local_files_only, backend=args.backend, stage1=stage1,
        sam=sam_spec(sam), depth_estimator=args.depth_model,
    )
    print(f"profile {engine.profile.name} ({engine.profile.origin or 'built-in'}); "
          f"attention backend {engine.backend} ({engine.backend_reason})")
    for path, scale in _loras(args):
        engine.load_lora(path, scale=scale)
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
    from threedis.engine.checks import parse_device
    from threedis.engine.outputs import check_output_folder, rerender_from_png
    from threedis.engine.preflight import check_files

    if args.layout is not None:
        raise UserError("give either a layout file or --from IMAGE.png, not both")
    defaults = vars(build_parser().parse_args(["render", "--from", str(args.from_png)]))
    changed = sorted(k for k, v in vars(args).items() if k not in _FROM_ALLOWED and v != defaults.get(k))
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise UserError(f"--from takes the render settings from the image; drop {flags} (or render the layout)")
    check_files({"--depth": args.depth})
    check_output_folder(args.out)
    args.device = parse_device(args.device)
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
        for path, scale in _loras(args) if args.lora else plan.loras:
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
    if args.from_png is not None:
        return _rerender(args)
    if args.layout is None:
        raise UserError("give a layout file (threedis render layout.json ...) or --from IMAGE.png")
    layout = Layout.load(args.layout)
    if not args.model:
        raise UserError("no model given: pass --model with a FLUX.1-Depth-dev folder or hub id "
                        "(or set $THREEDIS_MODEL); `threedis demo` runs on a tiny test checkpoint")
    stage1 = args.stage1 or "auto"
    _check_before_torch(args, args.model, stage1, sam_spec(args.sam))
    return _render(args, layout, args.model, stage1, args.sam)


def cmd_demo(args: argparse.Namespace) -> int:
    from threedis.engine.layout import example_path

    layout = Layout.load(example_path(args.example))
    sam = None if args.no_sam else args.sam
    _check_before_torch(args, args.model, args.stage1, sam_spec(sam))  # the tiny models come after
    if args.model:
        return _render(args, layout, args.model, args.stage1 or "auto", sam)
    from threedis.engine.tiny.flux import tiny_flux_path
    from threedis.engine.tiny.ldm3d import tiny_ldm3d_path
    from threedis.engine.tiny.sam2 import tiny_sam2_path

    model = str(tiny_flux_path())
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
    if sam == SAM_DEFAULT:  # asked for SAM2 without naming one: the tiny one, said to be random
        sam = str(tiny_sam2_path())
        print(f"SAM2: tiny random-weight checkpoint at {sam} (its masks are random shapes, not the instances)")
    return _render(args, layout, model, stage1, sam)


def _shrink_for_tiny(layout):
    """Same layout at <= DEMO_MAX_SIDE px on the long side (multiple of 16), so the demo runs in seconds on CPU."""
    scale = min(1.0, tiny_rules.DEMO_MAX_SIDE / max(layout.width, layout.height))
    width = max(16, int(layout.width * scale) // 16 * 16)
    height = max(16, int(layout.height * scale) // 16 * 16)
    return replace(layout, width=width, height=height)


def cmd_depth(args: argparse.Namespace) -> int:
    from threedis.engine.model_paths import depth_model_folder

    if args.out.exists() and not args.overwrite:  # before loading anything
        raise UserError(f"{args.out} already exists; choose another --out or pass --overwrite")
    if args.model:
        depth_model_folder(args.model)  # a folder that is not there: said before torch is imported
    _parse_device(args)
    from threedis.engine.depth_estimation import DEFAULT_DEPTH_MODEL, DepthEstimator, open_image
    from threedis.engine.outputs import save_image_new

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
    from threedis.engine.planner import DEFAULT_CONFIGS, STAGE2_MODELS, aux_configs, models_for, plan

    layout = Layout.load(args.layout)
    profile = load_profile(args.profile, _parse_overrides(args.overrides) or None)  # auto: torch only if CUDA may be
    stage1 = None if args.stage1 in (None, "auto") else args.stage1
    keys = models_for(stage1=args.stage1 is not None, sam2=args.sam is not None,
                      depth_estimator=args.depth_from_photo is not None)
    folders = {"stage1": stage1, "sam": sam_spec(args.sam), "depth": args.depth_model}
    models = {**{k: DEFAULT_CONFIGS[k] for k in STAGE2_MODELS},
              **aux_configs([k for k in keys if k not in STAGE2_MODELS], folders)}  # a local folder: its config
    size = args.stage1_size
    if size is None and tiny_rules.is_tiny(stage1):  # what a render on that checkpoint would use
        size = (tiny_rules.STAGE1_SIZE,) * 2
    result = plan(profile, layout.width, layout.height, len(layout.instances), chunk=args.chunk, models=models,
                  **({"stage1_size": size} if size else {}))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    return EXIT_PLAN_DOES_NOT_FIT if result.warnings else 0


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

    return run(args)  # it reads --device once it has checked the rest


def cmd_eval(args: argparse.Namespace) -> int:
    from threedis.engine.eval.command import cmd_eval as run

    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from threedis.engine.serve.server import main as serve_main  # checks first, then FastAPI; torch in the background

    args.sam = sam_spec(args.sam)  # a bare --sam: the default model, as no --sam
    return serve_main(args)  # --device is read as the models load, in the background


def cmd_bench(args: argparse.Namespace) -> int:
    from threedis.kernels.bench_attention import main as bench_main  # imports torch

    return bench_main(args.bench_args)


COMMANDS = {
    "render": cmd_render,
    "demo": cmd_demo,
    "batch": cmd_batch,
    "eval": cmd_eval,
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
    from threedis.engine.interrupts import Terminated, interrupt_message, terminate_like_interrupt

    try:
        with terminate_like_interrupt():  # SIGTERM cleans up as Ctrl-C does: no partial outputs, no temp folders
            return COMMANDS[args.command](args)  # each command reads --device once it has checked the rest
    except _user_errors() as err:
        print(f"threedis: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Terminated): say what is whole, if anything
        print(interrupt_message(err), file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except BrokenPipeError:  # `threedis profiles | head -1`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        return 0


if __name__ == "__main__":
    sys.exit(main())
