"""The real k-diffusion package (pip ``k-diffusion``, installed with ``--no-deps`` plus ``torchdiffeq``, ``torchsde``,
``trampoline``: its own dependencies pull torchvision, which does not install next to torch 2.13.0 here) as a peer for
tests and benchmarks: its ``sampling`` and ``external`` modules, imported without the package ``__init__``, with an
empty stand-in for ``torchvision`` while they import (only ``utils``' image helpers use it; the samplers and the
model wrappers never do). Used by ``tests/test_integrations.py`` and ``bench/solvers.py``."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types

INSTALL = ("pip install --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5 torchsde==0.2.6 trampoline==0.1.2")


def load_k_diffusion(*names: str) -> tuple:
    """(module for each of ``names``, e.g. "sampling", "external") and k-diffusion's version, or ImportError naming
    the install command."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"k-diffusion is not installed: {INSTALL}")
    if not isinstance(sys.modules.get("k_diffusion"), types.ModuleType) or \
            getattr(sys.modules["k_diffusion"], "__file__", None):  # never the real __init__ (torchvision)
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__package__ = "k_diffusion"
        sys.modules["k_diffusion"] = pkg
    stubbed = []
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules[name] = types.ModuleType(name)
            stubbed.append(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    try:
        mods = tuple(importlib.import_module(f"k_diffusion.{n}") for n in names)
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
    return (*mods, importlib.metadata.version("k-diffusion"))
