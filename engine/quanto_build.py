"""Where optimum-quanto compiles its C++ extensions: its own package folder if writable, else the threedis cache.

Why: quanto builds its unpack/matmul extensions on first use (the CPU one for every
quanto-int4 layer run on a CPU) into `<site-packages>/optimum/quanto/library/extensions/
<kind>/build`. In a system-wide or read-only install that folder cannot be written, and
the render died in its first step with a PermissionError from the compiler driver. Such
a build goes to `$THREEDIS_CACHE/quanto-extensions/` instead (quanto itself rebuilds it
when torch changes). Only the folder is chosen here, nothing is compiled: a model that
never runs int4 on a device never pays for that device's build.

The choice is per process (quanto keeps one build folder per extension), and the same
for every engine: a writable package folder is always kept.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from threedis.engine.errors import UserError

__all__ = ["EXTENSION_NAMES", "place_quanto_builds", "writable_folder"]

EXTENSION_NAMES = ("quanto_cpp", "quanto_cuda", "quanto_hip", "quanto_mps")  # those optimum-quanto registers


def writable_folder(folder: Path) -> bool:
    """Whether files can be made in `folder` (created if needed), proven with a real file, not permission bits."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".threedis-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return False
    return True


def place_quanto_builds(extensions: list | None = None, cache: Path | None = None) -> dict[str, Path]:
    """Point each registered quanto extension whose build folder cannot be written at one in the cache.

    extensions: quanto `Extension` objects (default: every one optimum-quanto registered);
    cache: the folder for relocated builds (default $THREEDIS_CACHE/quanto-extensions).
    Returns name -> build folder of the extensions moved. A UserError when neither folder
    can be written: the build would fail in the middle of a render.
    """
    if extensions is None:
        from optimum.quanto.library.extensions import get_extension, is_extension_available

        extensions = [get_extension(name) for name in EXTENSION_NAMES if is_extension_available(name)]
    moved: dict[str, Path] = {}
    for ext in extensions:
        current = Path(ext.build_directory)
        if writable_folder(current):
            continue
        if cache is None:
            from threedis.engine.paths import cache_root

            cache = cache_root() / "quanto-extensions"
        target = cache / ext.name
        if not writable_folder(target):
            raise UserError(f"optimum-quanto compiles its {ext.name} extension on first use, but neither its build "
                            f"folder {current} nor {target} can be written; set $THREEDIS_CACHE to a folder you can "
                            f"write, or choose a bf16/fp8 format for this model (--set MODEL.weights=bf16)")
        ext.build_directory = str(target)
        moved[ext.name] = target
    return moved
