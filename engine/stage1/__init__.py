"""Stage 1 of 3DIS: layout -> depth (SPEC section 6).

LDM3D-4c with the authors' fine-tuned text-to-depth UNet and MIGC-style layout
adapter: `Stage1Pipeline.from_pretrained(...).generate(prompt, instance_prompts, boxes)`
returns the scene depth map that stage 2 renders.
"""

from threedis.engine.stage1.checkpoint import (
    ADAPTER_FILENAME,
    UNET_FILENAME,
    WEIGHTS_REPO_ID,
    convert_to_safetensors,
    load_state_file,
)
from threedis.engine.stage1.pipeline import (
    DEFAULT_BASE_ID,
    DEFAULT_MIGC_STEPS,
    Stage1Cancelled,
    Stage1Pipeline,
    Stage1Result,
)

__all__ = [
    "ADAPTER_FILENAME",
    "DEFAULT_BASE_ID",
    "DEFAULT_MIGC_STEPS",
    "UNET_FILENAME",
    "WEIGHTS_REPO_ID",
    "Stage1Cancelled",
    "Stage1Pipeline",
    "Stage1Result",
    "convert_to_safetensors",
    "load_state_file",
]
