"""`threedis eval mig`: its arguments and what it runs (argparse only at import: `--help` needs no torch)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from threedis import UserError
from threedis.engine.eval.protocol import DEFAULT_DETECTOR as DETECTOR_ID
from threedis.engine.eval.protocol import DEFAULT_SEGMENTER as SEGMENTER_ID

EXAMPLES = """\
examples:
  threedis batch --from-mig mig_bench_anno.yaml --out runs/mig --seeds 0-3 --model /models/FLUX.1-Depth-dev
  threedis eval mig runs/mig                                     # -> table, runs/mig/eval-mig.json
  threedis eval mig migc_out/ --from-mig mig_bench_anno.yaml      # a folder of ..._<coco_id>.png (MIGC naming)
  threedis make-tiny grounding-dino /tmp/gd && threedis make-tiny sam-vit /tmp/sam
  threedis eval mig runs/mig --detector /tmp/gd --sam /tmp/sam    # offline check of the whole chain
see docs/eval.md
"""


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="score images on a benchmark (COCO-MIG)",
                       description="Score generated images with a benchmark's published protocol.")
    which = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", help="mig (COCO-MIG)")
    which.required = True
    m = which.add_parser(
        "mig", help="COCO-MIG: instance success, mIoU and image success per level (eval_mig.py's protocol)",
        description="Score a `threedis batch` run (read through its manifest) or a folder of images named\n"
                    "..._<coco_id>.png with COCO-MIG's protocol (eval_mig.py of LeyRio/MIG_Bench: Grounding DINO\n"
                    "finds each instance, SAM cuts it out for the colour test). Prints the table per level beside\n"
                    "the published numbers and writes the JSON. Results are cached per image beside the run.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("path", type=Path, metavar="RUN_DIR", help="a `threedis batch` output folder, or a folder of images")
    truth = m.add_argument_group("ground truth (a run knows its own jobs)")
    truth.add_argument("--from-mig", type=Path, default=None, metavar="FILE.yaml",
                       help="the COCO-MIG annotation file (MIGC's bench_file/mig_bench_anno.yaml)")
    truth.add_argument("--truth", type=Path, default=None, metavar="FILE.json",
                       help="the reference evaluator's ground truth (sample_prompt_color_split.json)")
    truth.add_argument("--jobs", type=Path, default=None, metavar="JOBS.jsonl",
                       help="a run's job file, when the manifest's is gone or moved")
    models = m.add_argument_group("models")
    models.add_argument("--detector", default=DETECTOR_ID, metavar="ID_OR_DIR",
                        help=f"Grounding DINO folder or hub id (default {DETECTOR_ID})")
    models.add_argument("--sam", default=SEGMENTER_ID, metavar="ID_OR_DIR",
                        help=f"SAM (ViT) folder or hub id (default {SEGMENTER_ID})")
    models.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    models.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="images per detector batch (default 16 on a GPU, 2 on the CPU; SAM takes half)")
    models.add_argument("--local-files-only", action="store_true", help="never try to download weights")
    out = m.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                     help="results JSON (default RUN_DIR/eval-mig.json, or FOLDER.eval-mig.json beside a folder; "
                          "- prints it instead of the table)")
    out.add_argument("--cache", type=Path, default=None, metavar="FILE.jsonl",
                     help="per-image result cache (default RUN_DIR/eval-mig-cache.jsonl)")
    out.add_argument("--no-cache", action="store_true", help="measure every image again, keep nothing")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_eval(args: argparse.Namespace) -> int:
    from threedis.engine.batch.manifest import MANIFEST_NAME
    from threedis.engine.checks import parse_device
    from threedis.engine.eval.cache import CACHE_NAME, ResultCache, beside_source
    from threedis.engine.eval.measure import measure_items
    from threedis.engine.eval.models import GroundingDino, SamViT, model_ident
    from threedis.engine.eval.report import build_report, table
    from threedis.engine.eval.sources import folder_source, load_truth, run_source
    from threedis.engine.outputs import check_output_folder, replace_file

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.path.is_dir():
        what = "not found" if not args.path.exists() else "is not a folder"
        raise UserError(f"{args.path} {what}: give a `threedis batch` output folder or a folder of images")
    if (args.path / MANIFEST_NAME).is_file():
        if args.truth is not None:
            raise UserError("--truth is for a plain folder of images; a run's truth comes from its jobs "
                            "(or --jobs / --from-mig)")
        source = run_source(args.path, jobs=args.jobs, from_mig=args.from_mig)
    else:
        if args.jobs is not None:
            raise UserError(f"--jobs goes with a `threedis batch` run; {args.path} has no {MANIFEST_NAME}")
        truth, truth_from = load_truth(args.from_mig, args.truth)
        source = folder_source(args.path, truth, truth_from)
    if not source.items:
        raise UserError(f"{args.path}: nothing to evaluate (no COCO-MIG jobs or images)")
    out = None if str(args.out) == "-" else (args.out or beside_source(source.kind, args.path, "eval-mig.json"))
    if out is not None:
        check_output_folder(out.resolve().parent, need_bytes=0)  # before the work, not after it
    device = parse_device(args.device)  # a device this machine has (None: cuda if present, else cpu)
    on_gpu = device.type == "cuda"
    batch = args.batch_size or (16 if on_gpu else 2)
    models = {"detector": model_ident(args.detector), "sam": model_ident(args.sam)}
    cache_path = None if args.no_cache else (args.cache or beside_source(source.kind, args.path, CACHE_NAME))
    cache = ResultCache(cache_path, [models["detector"], models["sam"]])
    results = measure_items(
        source.items,
        lambda: GroundingDino.from_pretrained(args.detector, device=device, local_files_only=args.local_files_only,
                                              batch_size=batch),
        lambda: SamViT.from_pretrained(args.sam, device=device, local_files_only=args.local_files_only,
                                       batch_size=max(1, batch // 2)),
        cache, progress=not args.no_progress)
    report = build_report(source, results, models)
    text = json.dumps(report, indent=1) + "\n"
    if out is None:
        sys.stdout.write(text)
        return 0
    replace_file(out, text.encode(), what=f"the results {out}")
    print(table(report))
    print(f"\nresults: {out}" + (f"\ncache: {cache_path}" if cache_path is not None else ""))
    return 0
