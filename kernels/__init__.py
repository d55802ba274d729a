"""Masked joint attention for 3DIS-FLUX: the rule, reference backends, Triton kernel.

Needs torch (and triton for the fused kernel) only: no diffusers import here.
"""

from threedis.kernels import rule
from threedis.kernels.rule import Phases, Schedule, TokenLayout

__all__ = ["rule", "Phases", "Schedule", "TokenLayout", "masked_joint_attention", "select_backend"]


def __getattr__(name):
    # The dispatch module is written by the attention-backend work; import it lazily
    # so `threedis.kernels.rule` stays importable on its own.
    if name in ("masked_joint_attention", "select_backend", "BACKENDS"):
        from threedis.kernels import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'threedis.kernels' has no attribute {name!r}")
