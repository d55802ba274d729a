"""The `threedis batch` subcommand: its arguments and what it runs (kept light: argparse at import)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from threedis import UserError
from threedis.engine.cli_args import add_lora_argument, add_sam_argument, loras, sam_spec

EXAMPLES = """\
examples:
  threedis batch jobs.jsonl --out runs/a --seeds 0-3             # one GPU (tiny checkpoints without --model)
  threedis batch jobs.jsonl --out runs/a --model /models/FLUX.1-Depth-dev --ray              # every GPU here
  threedis batch jobs.jsonl --out runs/a --model /models/FLUX.1-Depth-dev --ray HEAD:6379    # a Ray cluster
  threedis batch --from-mig mig_bench_anno.yaml --write-jsonl mig.jsonl                    # convert only
  threedis batch --from-mig mig_bench_anno.yaml --out runs/mig --seeds 0-3 --size 512 --steps 20 --guidance 10 \\
      --model /models/FLUX.1-Depth-dev                                             # the paper's COCO-MIG runs
  threedis batch export-mig runs/mig mig-export/        # as the reference evaluator reads it (docs/eval.md)
run the same command again to resume; see docs/batch.md
"""


def add_batch_parser(sub: Any) -> None:
    p = sub.add_parser("batch", help="render many layouts x seeds, resumable, here or across a Ray cluster",
                       description="Render every (job, seed) of a JSONL job file into --out, one folder per "
                                   "job, with a manifest; the same command again resumes.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", nargs="*", metavar="JOBS.jsonl",
                   help="JSONL job file (one job a line; see docs/batch.md); or `export-mig RUN_DIR DEST`: link a "
                        "COCO-MIG run's images into DEST as the reference evaluator reads them")
    p.set_defaults(batch_parser=p)  # export-mig refuses the flags it would ignore
    p.add_argument("--out", type=Path, default=None, help="output folder (holds manifest.jsonl)")
    p.add_argument("--seeds", default=None, metavar="SEEDS",
                   help="seeds for jobs that give none: 7, 0-3 or 0,2,5-7 (default 0)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="denoising steps for jobs that give none (default 20; 4 on the tiny checkpoints)")
    p.add_argument("--guidance", type=float, default=None, metavar="G",
                   help="guidance for jobs that give none (default 10.0)")
    p.add_argument("--size", default=None, metavar="WxH",
                   help="render every layout at this size, e.g. 512 or 768x512 (boxes are normalised; default: "
                        "each layout's own)")
    p.add_argument("--retry-failed", action="store_true", help="render again the items that failed before")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    mig = p.add_argument_group("COCO-MIG")
    mig.add_argument("--from-mig", type=Path, default=None, metavar="FILE.yaml",
                     help="take the jobs from a COCO-MIG annotation file (MIGC's bench_file/mig_bench_anno.yaml)")
    mig.add_argument("--write-jsonl", type=Path, default=None, metavar="JOBS.jsonl",
                     help="with --from-mig: write the jobs as JSONL (and render only if --out is given)")
    mig.add_argument("--mig-size", type=int, default=None, metavar="PX",
                     help="layout size of COCO-MIG jobs (default 512; rendering straight from the YAML on the tiny "
                          "checkpoints: 64)")
    models = p.add_argument_group("models and runtime")
    models.add_argument("--model", default=os.environ.get("THREEDIS_MODEL"),
                        help="FLUX.1-Depth-dev folder or hub id (default $THREEDIS_MODEL, else the tiny checkpoints)")
    models.add_argument("--stage1", default=os.environ.get("THREEDIS_STAGE1"), metavar="PATH_OR_ID",
                        help="stage-1 model for jobs without a depth map (default: the tiny one without --model, "
                             "else the authors' release or $THREEDIS_STAGE1)")
    add_sam_argument(models, "SAM2 model for jobs with \"sam\": true (default, and a bare --sam: "
                             "facebook/sam2.1-hiera-large; the tiny one without --model)")
    models.add_argument("--depth-model", default=os.environ.get("THREEDIS_DEPTH_MODEL"), metavar="PATH_OR_ID",
                        help="depth estimator for jobs with depth_from_photo (default "
                             "depth-anything/Depth-Anything-V2-Large-hf or $THREEDIS_DEPTH_MODEL)")
    models.add_argument("--profile", default="auto", help="memory profile name or TOML file (default: auto)")
    models.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile key, e.g. --set transformer.weights=nf4 (repeatable)")
    models.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    models.add_argument("--backend", default="auto", choices=["auto", "triton", "flex", "sdpa"],
                        help="masked-attention backend (auto: triton on CUDA, else flex/sdpa)")
    add_lora_argument(models)
    models.add_argument("--local-files-only", action="store_true", help="never try to download weights")
    ray = p.add_argument_group("Ray")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="spread over Ray workers: a cluster ADDRESS (host:6379, ray://host:10001, auto) or, "
                          "without one, a Ray instance started here")
    ray.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU)")
    ray.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                     help="GPUs per Ray worker (default 1, or 0 on a cluster without GPUs)")


def _check_before_torch(args: argparse.Namespace) -> dict[str, Any]:
    """What a batch can be refused for from its flags alone, said before torch is imported (seconds, tens of
    seconds on a busy machine) and before the output folder is made: the numbers, the job file, the model
    folders and LoRA files named, the profile on this device, the output folder (as render checks its own,
    engine/preflight.py). Returns the checked --seeds/--steps/--guidance/--size as JobDefaults fields.
    """
    from threedis.engine.paths import check_folder_could_be_made, input_file
    from threedis.engine.preflight import check_models, check_profile
    from threedis.engine.profiles import parse_overrides

    changes = _flag_settings(args)
    if args.from_mig is not None:
        input_file(args.from_mig, "COCO-MIG file")
    elif args.jobs:
        input_file(args.jobs[0], "job file")
    check_models(model=args.model or None, loras=[path for path, _ in args.lora])
    check_profile(args.profile, parse_overrides(args.overrides), args.device)
    if args.out is not None:
        check_folder_could_be_made(args.out, "output folder", "choose another --out")
    return changes


def _flag_settings(args: argparse.Namespace) -> dict[str, Any]:
    """--seeds, --steps, --guidance and --size, checked (no torch): the JobDefaults fields they set."""
    from threedis.engine.batch.seeds import parse_seeds
    from threedis.engine.checks import check_guidance, check_steps
    from threedis.engine.layout import DEFAULT_LAYOUT_LIMITS, SIZE_MULTIPLE, LayoutError, check_pixels
    from threedis.engine.sizes import parse_size

    changes: dict[str, Any] = {}
    if args.seeds is not None:
        changes["seeds"] = parse_seeds(args.seeds, "--seeds")
    if args.steps is not None:
        changes["steps"] = check_steps(args.steps, "--steps")
    if args.guidance is not None:
        changes["guidance"] = check_guidance(args.guidance, "--guidance")
    if args.size is not None:  # the layout's own rule: its multiple (one FLUX token), side and pixel limits
        changes["size"] = parse_size(args.size, "--size", SIZE_MULTIPLE, DEFAULT_LAYOUT_LIMITS.max_side)
        try:
            check_pixels(*changes["size"])
        except LayoutError as err:
            raise UserError(f"--size {args.size}: {str(err).removeprefix('width: ')}") from None
    return changes


def _check_models_jobs_need(args: argparse.Namespace, needs: frozenset[str]) -> None:
    """The auxiliary model folders named by flags that some job will load (stage 1, SAM2, the depth
    estimator): a folder that is not there is one line now, not a failed row for every item."""
    from threedis.engine.preflight import check_models

    check_models(stage1=args.stage1 if "stage1" in needs else None,
                 sam=sam_spec(args.sam) if "sam" in needs else None,
                 depth_model=args.depth_model if "photo" in needs else None)


def _defaults(args: argparse.Namespace, tiny: bool, changes: dict[str, Any]) -> Any:
    """What jobs get for the settings they leave out: the command's flags (`changes`, checked), else the
    defaults (tiny or real)."""
    from threedis.engine.batch.jobs import TINY_DEFAULTS, JobDefaults
    from threedis.engine.stages import default_stage1
    from threedis.engine.tiny_rules import is_tiny

    base = TINY_DEFAULTS if tiny or is_tiny(args.model) else JobDefaults()
    if args.stage1 is not None:  # the stage-1 model decides stage 1's numbers (stages.default_stage1)
        base = replace(base, stage1=default_stage1(args.stage1))
    return replace(base, **changes)


def _largest(jobs: Any) -> Any:
    """The batch's most demanding render (pixels, instances, stage-1 size), for what may stay loaded."""
    from threedis.engine.batch.worker import Largest

    good = [job for job in jobs.jobs if job.problem is None and job.layout is not None]
    if not good:
        return None
    big = max(good, key=lambda job: job.layout.width * job.layout.height)
    stage1 = [job.stage1 for job in good if job.stage1 is not None]
    return Largest(width=big.layout.width, height=big.layout.height,
                   instances=max(len(job.layout.instances) for job in good),
                   stage1=max(stage1, key=lambda s: s.size[0] * s.size[1]) if stage1 else None,
                   sam=any(job.sam for job in good), photo=any(job.depth_from_photo for job in good))


def _run_record(jobs_path: Path, out: Path, seeds: str | None) -> dict[str, Any]:
    """What each manifest row says about the command: its job file (relative to DIR when inside) and seeds."""
    resolved = jobs_path.resolve()
    try:
        where = str(resolved.relative_to(out.resolve()))
    except ValueError:
        where = str(resolved)
    return {"jobs_file": where, "seeds": seeds if seeds is not None else "0"}


def cmd_batch(args: argparse.Namespace) -> int:
    if args.jobs and args.jobs[0] == "export-mig":
        return _export_mig(args)
    if len(args.jobs) > 1:
        raise UserError(f"give one JSONL job file, got {len(args.jobs)} ({' '.join(args.jobs)})")
    if args.ray is None and (args.workers is not None or args.gpus_per_worker is not None):
        raise UserError("--workers and --gpus-per-worker apply to Ray mode; add --ray")
    if args.from_mig is not None:
        if args.jobs:
            raise UserError("give either a JSONL job file or --from-mig FILE.yaml, not both")
        if args.write_jsonl is None and args.out is None:
            raise UserError("--from-mig needs --out DIR (to render) or --write-jsonl JOBS.jsonl (to convert)")
    else:
        if not args.jobs:
            raise UserError("give a JSONL job file (threedis batch jobs.jsonl --out DIR) or --from-mig FILE.yaml")
        if args.write_jsonl is not None or args.mig_size is not None:
            raise UserError("--write-jsonl and --mig-size go with --from-mig")
    changes = _check_before_torch(args)
    if args.device is not None:
        from threedis.engine.checks import parse_device

        args.device = parse_device(args.device)  # torch from here on
    if args.ray is not None:
        from threedis.engine.batch.ray_runner import import_ray

        import_ray()  # before anything else: say how to install it
    from threedis.engine.batch.driver import run_batch
    from threedis.engine.batch.jobs import load_jobs
    from threedis.engine.batch.worker import EngineSpec
    from threedis.engine.profiles import parse_overrides

    tiny = not args.model
    defaults = _defaults(args, tiny, changes)
    prepare = None
    if args.from_mig is not None:
        mig = _import_mig(args, tiny, defaults)
        if mig is None:
            return 0
        jobs_path, jobs, prepare = mig
    else:
        if args.out is None:
            raise UserError("give an output folder: --out DIR")
        jobs_path = Path(args.jobs[0])
        jobs = load_jobs(jobs_path, defaults)
    if jobs.problems:
        print(f"{len(jobs.problems)} job line(s) have problems and are recorded as failed, once each "
              f"(threedis validate {jobs_path} lists them)")
    needs = frozenset().union(*(job.needs for job in jobs.jobs))
    _check_models_jobs_need(args, needs)
    spec = EngineSpec(model=args.model or None, profile=args.profile, overrides=parse_overrides(args.overrides),
                      device=args.device, backend=args.backend, stage1=args.stage1, sam=sam_spec(args.sam),
                      depth_model=args.depth_model, local_files_only=args.local_files_only, needs=needs,
                      loras=tuple(loras(args.lora, resolve=True)), largest=_largest(jobs))
    if tiny:
        print("no --model given: rendering on the tiny random-weight checkpoints (noise-like pictures)")
    if args.ray is not None:
        from threedis.engine.batch.ray_runner import RayRunner

        runner: Any = RayRunner(spec, address=args.ray, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                                on_note=print)
    else:
        from threedis.engine.batch.local import LocalRunner

        runner = LocalRunner(spec, on_note=print)
    summary = run_batch(jobs, args.out, runner, retry_failed=args.retry_failed, progress=not args.no_progress,
                        run=_run_record(jobs_path, args.out, args.seeds), prepare=prepare)
    print(summary.text())
    print(f"manifest: {args.out / 'manifest.jsonl'}")
    if summary.interrupted:
        print("interrupted: run the same command again to resume")
        return 130
    if summary.remaining_failed:
        print(f"{summary.remaining_failed} item(s) remain failed: the manifest's rows say why; fix them and run "
              f"again with --retry-failed")
        return 1
    return 0


def _import_mig(args: argparse.Namespace, tiny: bool, defaults: Any) -> tuple[Path, Any, Any] | None:
    """--from-mig: (job file, its jobs, what writes it under the output folder's lock), or None when only
    converting. With --write-jsonl the file is written now and its jobs rendered if --out is given; else the
    jobs go to DIR/jobs-mig.jsonl, written once the batch holds DIR (a second command on DIR never replaces
    the job file of the one still running), the same file each run so that a rerun resumes.

    The layout size is --mig-size, else 512 (the benchmark's), except when rendering straight from the
    YAML on the tiny checkpoints (64, so a check of the chain takes seconds); --write-jsonl always
    converts at the benchmark's size unless told otherwise.
    """
    from threedis.engine.batch.jobs import jobs_from_lines, load_jobs
    from threedis.engine.batch.mig import MIG_JOBS_NAME, mig_jobs, write_jobs_jsonl

    straight = args.write_jsonl is None
    size = args.mig_size if args.mig_size is not None else (64 if tiny and straight else 512)
    objects = mig_jobs(args.from_mig, size=size)
    if not straight:
        path = write_jobs_jsonl(objects, args.write_jsonl)
        print(f"wrote {len(objects)} COCO-MIG jobs ({size}x{size}) to {path}")
        return None if args.out is None else (path, load_jobs(path, defaults), None)
    path = args.out / MIG_JOBS_NAME
    jobs = jobs_from_lines([json.dumps(job) for job in objects], path, defaults)
    return path, jobs, lambda out: write_jobs_jsonl(objects, out / MIG_JOBS_NAME, overwrite=True)


def _export_mig(args: argparse.Namespace) -> int:
    """`threedis batch export-mig RUN_DIR DEST`."""
    from threedis.engine.eval.export import export_mig

    if len(args.jobs) != 3:
        raise UserError("usage: threedis batch export-mig RUN_DIR DEST")
    ignored = [action.option_strings[-1] for action in args.batch_parser._actions
               if action.option_strings and action.dest not in ("help", "from_mig")
               and getattr(args, action.dest, action.default) != action.default]
    if ignored:
        raise UserError(f"export-mig takes RUN_DIR DEST and --from-mig only; {', '.join(ignored)} would be ignored: "
                        f"drop it")
    run_dir, dest = Path(args.jobs[1]), Path(args.jobs[2])
    done = export_mig(run_dir, dest, from_mig=args.from_mig)
    print(f"linked {done.linked} image(s) into {done.images}"
          + (f" ({done.not_rendered} not rendered: failed or missing)" if done.not_rendered else ""))
    print(f"ground truth: {done.truth}")
    print(f"reference evaluator (LeyRio/MIG_Bench): copy {done.truth.name} into its folder, then "
          f"python eval_mig.py --need_miou_score --need_instance_sucess_ratio --image_dir {done.images}")
    return 0
