"""pfbdiff: PFB-Diff (Progressive Feature Blending Diffusion) text-driven local image editing on diffusers.

Public names are imported lazily, so ``import pfbdiff`` (and the CLI's ``--help``) stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PFBDiffPipeline": ".pipeline",
    "PFBDiffOutput": ".pipeline",
    "load_pipeline": ".pipeline",
    "Inversion": ".engine.inversion",
    "EditConfig": ".engine.presets",
    "PRESETS": ".engine.presets",
    "get_preset": ".engine.presets",
    "PFBDiffError": ".errors",
    "replay": ".apps.request",
}

__all__ = [*_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'pfbdiff' has no attribute {name!r}")
