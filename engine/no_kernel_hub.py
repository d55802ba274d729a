"""bitsandbytes without its kernel-hub lookup: imported under the engine, it reaches no network, prints nothing.

bitsandbytes (0.49 and later) asks the Hugging Face kernel hub for a CPU 4-bit matmul while
its CPU ops module is imported on a CPU with AVX512-BF16 (`kernels.get_kernel(
"kernels-community/quantization-bitsandbytes")`): a network request, a download of code
when it succeeds, and the line "Failed to load CPU gemm_4bit_forward from kernels-community:
..." when it fails (offline, publisher not verified). Every diffusers model class imports
peft, and peft imports bitsandbytes whenever it is installed, so every render on such a CPU
would do this. The engine never runs that kernel (its bitsandbytes formats need CUDA:
profiles.Weights.needs_cuda), and bitsandbytes computes with its own library without it.

`install()` runs when threedis.engine is imported and adds an import hook for that one
module: while it executes, `kernels.get_kernel` refuses at once and the warning record about
it is dropped; both are restored right after. A bitsandbytes imported before threedis.engine
is left as it is. Standard library only: this runs before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import sys
from types import ModuleType
from typing import Any, Iterator

__all__ = ["CPU_OPS", "KernelHubRefused", "install", "no_kernel_hub"]

CPU_OPS = "bitsandbytes.backends.cpu.ops"  # the module whose import runs the lookup
_WARNING_START = "Failed to load CPU gemm_4bit_forward"  # bitsandbytes' words when the lookup fails


class KernelHubRefused(RuntimeError):
    """What `kernels.get_kernel` raises while bitsandbytes' CPU ops are imported under the engine."""


def _refuse(repo_id: str, *args: Any, **kwargs: Any) -> ModuleType:
    raise KernelHubRefused(f"threedis imports bitsandbytes without kernel-hub lookups ({repo_id})")


class _DropLookupWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_WARNING_START)


@contextlib.contextmanager
def no_kernel_hub() -> Iterator[None]:
    """While the block runs, `kernels.get_kernel` refuses and bitsandbytes' warning about that is dropped."""
    try:
        import kernels  # Hugging Face's package (transformers needs it); torch is loaded by now
    except ImportError:  # bitsandbytes' own `from kernels import get_kernel` then fails, and logs: dropped too
        kernels = None
    logger = logging.getLogger(CPU_OPS)
    quiet = _DropLookupWarning()
    logger.addFilter(quiet)
    saved = getattr(kernels, "get_kernel", None)
    if saved is not None:
        kernels.get_kernel = _refuse
    try:
        yield
    finally:
        if saved is not None:
            kernels.get_kernel = saved
        logger.removeFilter(quiet)


class _Loader(importlib.abc.Loader):
    """The module's own loader, run inside no_kernel_hub(); anything else is asked of the original."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with no_kernel_hub():
            self._inner.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes' CPU ops module as the other finders do and wraps its loader; nothing else."""

    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> Any:
        if name != CPU_OPS:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if isinstance(finder, _Finder) or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Add the hook once per process (a no-op when bitsandbytes' CPU ops are already imported)."""
    if CPU_OPS in sys.modules or any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
