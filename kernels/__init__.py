"""Masked joint attention for 3DIS-FLUX: the rule, reference backends, Triton kernel.

Needs torch (and triton for the fused kernel) only: no diffusers import here.
"""

if __name__ != "threedis.kernels":  # found as a bare `kernels` (checkout root on sys.path): yield to an installed one
    from threedis._step_aside import step_aside

    step_aside(__name__, __file__)

import importlib

__all__ = ["rule", "Phases", "Schedule", "TokenLayout", "masked_joint_attention", "select_backend"]

# Imported on first use: `threedis.kernels.backend_order` (which the memory planner reads) must
# not pull torch in, and the rule stays importable without the attention dispatch.
_LAZY = {"rule": None, "Phases": "rule", "Schedule": "rule", "TokenLayout": "rule",
         "masked_joint_attention": "attention", "select_backend": "attention", "BACKENDS": "attention"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'threedis.kernels' has no attribute {name!r}")
    if _LAZY[name] is None:
        return importlib.import_module(f"threedis.kernels.{name}")
    return getattr(importlib.import_module(f"threedis.kernels.{_LAZY[name]}"), name)
