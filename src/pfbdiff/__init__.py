"""pfbdiff: PFB-Diff (Progressive Feature Blending Diffusion) text-driven local image editing on diffusers."""

from .errors import PFBDiffError
from .inversion import Inversion
from .pipeline import PFBDiffOutput, PFBDiffPipeline
from .presets import PRESETS, EditConfig, get_preset

__version__ = "0.1.0"


def load_pipeline(model, *, torch_dtype=None, device=None, allow_pickle=False, config=None) -> PFBDiffPipeline:
    """Load a PFB-Diff pipeline from a hub id, a local diffusers folder or a single ``.safetensors`` file."""
    return PFBDiffPipeline.from_pretrained(
        model, torch_dtype=torch_dtype, device=device, allow_pickle=allow_pickle, config=config
    )


__all__ = [
    "EditConfig",
    "Inversion",
    "PFBDiffError",
    "PFBDiffOutput",
    "PFBDiffPipeline",
    "PRESETS",
    "get_preset",
    "load_pipeline",
]
