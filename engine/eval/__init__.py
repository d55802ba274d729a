"""`threedis eval`: benchmark scores of generated images, first COCO-MIG (`threedis eval mig`).

This package owns the COCO-MIG protocol of the reference evaluator (eval_mig.py in
LeyRio/MIG_Bench; docs/eval.md checks it point by point): its numbers (protocol.py),
the ground truth (truth.py), what to score in a batch run or a plain folder
(sources.py), OpenCV's HSV colour test (colour.py), box overlap and NMS (boxes.py),
the detector and SAM through transformers (models.py), measuring images in batches
with a per-image cache (measure.py, cache.py), the rules and rates per level and
seed (score.py), the table and JSON (report.py), the command (command.py) and the
export of a run for the reference evaluator (export.py). It reaches the engine only
through the public API (threedis.UserError, Layout) and a run's batch manifest and
job file (threedis.engine.batch); it never renders.
"""
