"""The `threedis batch` subcommand: its arguments and what it runs (kept light: argparse at import)."""

from __future__ import annotations

import argparse
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
  threedis batch --from-mig mig_bench_anno.yaml --out runs/mig --seeds 0-3 --model ...
run the same command again to resume; see docs/batch.md
"""


def add_batch_parser(sub: Any) -> None:
    p = sub.add_parser("batch", help="render many layouts x seeds, resumable, here or across a Ray cluster",
                       description="Render every (job, seed) of a JSONL job file into --out, one folder per "
                                   "job, with a manifest; the same command again resumes.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", type=Path, nargs="?", help="JSONL job file (one job a line; see docs/batch.md)")
    p.add_argument("--out", type=Path, default=None, help="output folder (holds manifest.jsonl)")
    p.add_argument("--seeds", default=None, metavar="SEEDS",
                   help="seeds for jobs that give none: 7, 0-3 or 0,2,5-7 (default 0)")
    p.add_argument("--retry-failed", action="store_true", help="render again the items that failed before")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    mig = p.add_argument_group("COCO-MIG")
    mig.add_argument("--from-mig", type=Path, default=None, metavar="FILE.yaml",
                     help="take the jobs from a COCO-MIG annotation file (MIGC's bench_file/mig_bench_anno.yaml)")
    mig.add_argument("--write-jsonl", type=Path, default=None, metavar="JOBS.jsonl",
                     help="with --from-mig: write the jobs as JSONL (and render only if --out is given)")
    mig.add_argument("--mig-size", type=int, default=None, metavar="PX",
                     help="layout size of COCO-MIG jobs (default 512; 64 on the tiny checkpoints)")
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


def cmd_batch(args: argparse.Namespace) -> int:
    from threedis.engine.batch.driver import run_batch
    from threedis.engine.batch.jobs import TINY_DEFAULTS, JobDefaults, load_jobs
    from threedis.engine.batch.seeds import parse_seeds
    from threedis.engine.batch.worker import EngineSpec
    from threedis.engine.profiles import parse_overrides
    from threedis.engine.stages import default_stage1
    from threedis.engine.tiny_rules import is_tiny

    if args.ray is None and (args.workers is not None or args.gpus_per_worker is not None):
        raise UserError("--workers and --gpus-per-worker apply to Ray mode; add --ray")
    if args.ray is not None:
        from threedis.engine.batch.ray_runner import import_ray

        import_ray()  # before anything else: say how to install it
    tiny = not args.model
    if args.from_mig is not None:
        jobs_path = _import_mig(args, tiny)
        if jobs_path is None:
            return 0
    else:
        if args.jobs is None:
            raise UserError("give a JSONL job file (threedis batch jobs.jsonl --out DIR) or --from-mig FILE.yaml")
        if args.write_jsonl is not None or args.mig_size is not None:
            raise UserError("--write-jsonl and --mig-size go with --from-mig")
        jobs_path = args.jobs
    if args.out is None:
        raise UserError("give an output folder: --out DIR")
    base = TINY_DEFAULTS if tiny or is_tiny(args.model) else JobDefaults()
    if args.stage1 is not None:  # the stage-1 model decides stage 1's numbers (stages.default_stage1)
        base = replace(base, stage1=default_stage1(args.stage1))
    defaults = replace(base, seeds=parse_seeds(args.seeds, "--seeds")) if args.seeds is not None else base
    jobs = load_jobs(jobs_path, defaults)
    if jobs.problems:
        print(f"{len(jobs.problems)} job(s) have problems and are recorded as failed "
              f"(threedis validate {jobs_path} lists them)")
    needs = frozenset().union(*(job.needs for job in jobs.jobs))
    spec = EngineSpec(model=args.model or None, profile=args.profile, overrides=parse_overrides(args.overrides),
                      device=args.device, backend=args.backend, stage1=args.stage1, sam=sam_spec(args.sam),
                      depth_model=args.depth_model, local_files_only=args.local_files_only, needs=needs,
                      loras=tuple(loras(args.lora, resolve=True)))
    if tiny:
        print("no --model given: rendering on the tiny random-weight checkpoints (noise-like pictures)")
    if args.ray is not None:
        from threedis.engine.batch.ray_runner import RayRunner

        runner: Any = RayRunner(spec, address=args.ray, workers=args.workers, gpus_per_worker=args.gpus_per_worker)
    else:
        from threedis.engine.batch.local import LocalRunner

        runner = LocalRunner(spec)
    summary = run_batch(jobs, args.out, runner, retry_failed=args.retry_failed, progress=not args.no_progress)
    print(summary.text())
    print(f"manifest: {args.out / 'manifest.jsonl'}")
    if summary.interrupted:
        print("interrupted: run the same command again to resume")
        return 130
    return 1 if summary.failed else 0


def _import_mig(args: argparse.Namespace, tiny: bool) -> Path | None:
    """--from-mig: the jobs as JSONL (--write-jsonl, or DIR/jobs-mig.jsonl); None when only converting."""
    from threedis.engine.batch.mig import mig_jobs, write_jobs_jsonl

    if args.jobs is not None:
        raise UserError("give either a JSONL job file or --from-mig FILE.yaml, not both")
    size = args.mig_size if args.mig_size is not None else (64 if tiny else 512)
    jobs = mig_jobs(args.from_mig, size=size)
    if args.write_jsonl is not None:
        path = write_jobs_jsonl(jobs, args.write_jsonl)
        print(f"wrote {len(jobs)} COCO-MIG jobs ({size}x{size}) to {path}")
        if args.out is None:
            return None
        return path
    if args.out is None:
        raise UserError("--from-mig needs --out DIR (to render) or --write-jsonl JOBS.jsonl (to convert)")
    path = args.out / "jobs-mig.jsonl"
    write_jobs_jsonl(jobs, path, overwrite=True)  # the same file each run, so resuming finds the same jobs
    return path
