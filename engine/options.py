"""RenderOptions: the rarely changed knobs of a render, in a module of their own.

Engine.render takes them, and outputs.render_kwargs_from_metadata rebuilds them from an
image's metadata; neither module has to import the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from threedis.engine.checks import check_chunk
from threedis.engine.errors import UserError

__all__ = ["RenderOptions"]


@dataclass(frozen=True)
class RenderOptions:
    """The rarely changed knobs of a render, grouped so that the common call stays short.

    chunk: T5 tokens kept per prompt (SPEC 2, default 200). append_instances: append each
    instance's description to the global prompt, as the authors do. permute_tokens: group
    image tokens by instance so whole attention tiles can be skipped (same image, faster
    kernel). preview: decode a small preview image for on_step every step.
    """

    chunk: int = 200
    append_instances: bool = True
    permute_tokens: bool = False
    preview: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunk", check_chunk(self.chunk))
        for name in ("append_instances", "permute_tokens", "preview"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
