"""pfbdiff: PFB-Diff (Progressive Feature Blending Diffusion) text-driven local image editing on diffusers.

Public names are imported lazily, so ``import pfbdiff`` (and the CLI's ``--help``) stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PFBDiffPipeline": ".pipeline",
    "PFBDiffOutput": ".pipeline",
    "Inversion": ".inversion",
    "EditConfig": ".presets",
    "PRESETS": ".presets",
    "get_preset": ".presets",
    "PFBDiffError": ".errors",
    "replay": ".provenance",
}

__all__ = [*_EXPORTS, "load_pipeline"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'pfbdiff' has no attribute {name!r}")


def load_pipeline(model, *, torch_dtype=None, device=None, allow_pickle=False, config=None):
    """Load a PFB-Diff pipeline from a model name, a hub id, a diffusers folder or a ``.safetensors`` file."""
    from .pipeline import PFBDiffPipeline

    return PFBDiffPipeline.from_pretrained(
        model, torch_dtype=torch_dtype, device=device, allow_pickle=allow_pickle, config=config
    )
