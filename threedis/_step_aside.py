"""Keep the checkout's top-level folders from shadowing installed packages of the same name.

The design card keeps engine/, kernels/, profiles/ and examples/ at the checkout root, mapped by
pyproject.toml to threedis.engine, threedis.kernels, ... Whenever the checkout root is on sys.path
(`python -c`, `python -m`, `python -`, a script or notebook in the root, a subprocess or Ray worker
started there), Python also finds those folders under their bare names, first; and `kernels` is
Hugging Face's package, which transformers and bitsandbytes import. So each of these folders'
`__init__` calls `step_aside` when it is imported under its bare name: the import then yields the
installed package of that name, or fails as if the folder were not there. Standard library only:
this runs before anything else of threedis.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType


def _inside(path: str | None, folder: str) -> bool:
    if not path:
        return False
    real = os.path.realpath(path)
    return real == folder or real.startswith(folder + os.sep)


def _spec_is_ours(spec: importlib.machinery.ModuleSpec, folder: str) -> bool:
    locations = list(spec.submodule_search_locations or [])
    return _inside(spec.origin, folder) or any(_inside(p, folder) for p in locations)


def _find_elsewhere(name: str, folder: str) -> importlib.machinery.ModuleSpec | None:
    """The spec `import name` would find if the folder's parent were not on sys.path."""
    root = os.path.dirname(folder)
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        path_based = finder is importlib.machinery.PathFinder
        spec = find_spec(name, elsewhere if path_based else None)
        if spec is not None and not _spec_is_ours(spec, folder):
            return spec
    return None


def step_aside(name: str, init_file: str) -> ModuleType:
    """Replace the bare-named import of this checkout folder with the installed package `name`.

    Called from the folder's `__init__` while Python imports it as `name`: the module it leaves in
    sys.modules is what that import statement returns.
    """
    folder = os.path.realpath(os.path.dirname(init_file))
    spec = _find_elsewhere(name, folder)
    if spec is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the checkout's folder {name}/ is threedis.{name}, not a top-level package)",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        if spec.loader is not None:
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
