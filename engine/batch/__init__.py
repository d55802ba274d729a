"""`threedis batch`: many layouts x seeds, resumable, in this process or across a Ray cluster.

This package owns the batch job file (jobs.py), the COCO-MIG importer (mig.py),
the append-only manifest and resume decisions (manifest.py), writing each
item's files (files.py), one item's render on a worker (worker.py), the local
and Ray runners (local.py, ray_runner.py), progress and the summary
(progress.py) and the driver tying them together (driver.py), which holds the
output folder's lock (threedis.engine.locks) while it writes. It reaches the
engine only through its public API (threedis.Engine, Layout, RenderOptions,
Stage1Options, UserError, RenderCancelled) and the shared file helpers
(threedis.engine.outputs). `threedis batch export-mig` is the COCO-MIG
evaluation's (threedis.engine.eval.export).
"""
