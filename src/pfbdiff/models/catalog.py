"""The models pfbdiff knows by name, and what can be read of a model before it is loaded.

Loading weights takes seconds; reading a config file does not. The front ends check a request against the
model it names (the steps its scheduler was trained with) from here, before anything heavy is imported, so a
mistake is reported at once. Only local folders are read: for a hub id or a single file the same rule runs
again in the engine once the model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Models named by a short name instead of a path (``pfbdiff.models.loading.MODEL_ALIASES`` loads them).
SHORT_NAMES = ("tiny", "shapes", "shapes-xl", "shapes-sd3")
#: Where the bundled ShapesWorld model ships (a diffusers folder), when it does.
BUNDLED_SHAPES_MODEL = Path(__file__).parent.parent / "shapes" / "model"
#: Its SDXL-layout sibling (two text encoders, pooled vector, size ids), for measuring PFB-Diff on SDXL's layout.
BUNDLED_SHAPES_XL_MODEL = Path(__file__).parent.parent / "shapes" / "model_sdxl"
#: Its SD3-layout sibling (a flow-matching transformer), for measuring PFB-Diff on SD3 and Flux's kind of model.
BUNDLED_SHAPES_SD3_MODEL = Path(__file__).parent.parent / "shapes" / "model_sd3"
BUNDLED_NAMES = ("shapes", "shapes-xl", "shapes-sd3")
#: How to make each bundled model where an install lacks it.
TRAINING_HINTS = {
    "shapes": "train and export it with `python -m pfbdiff.shapes.train --out runs/shapes --stage all "
              "--export-dir src/pfbdiff/shapes/model`",
    "shapes-xl": "train it with `python -m pfbdiff.shapes.train --family sdxl --init-from src/pfbdiff/shapes/model "
                 "--export-dir src/pfbdiff/shapes/model_sdxl`",
    "shapes-sd3": "train it with `python -m pfbdiff.shapes.train --family sd3 --init-from src/pfbdiff/shapes/model "
                  "--object-weight 3 --export-dir src/pfbdiff/shapes/model_sd3`",
}
#: diffusers' default ``num_train_timesteps``, used when a scheduler config leaves it out.
DEFAULT_TRAINING_STEPS = 1000
#: The file in a model folder that carries the settings the model is meant to be used with (its makers' numbers).
RECOMMENDED_FILE = "pfbdiff.json"
#: What a model that recommends nothing is run with: diffusers' Stable Diffusion defaults.
DEFAULT_RECOMMENDED = {"num_inference_steps": 50, "guidance_scale": 7.5}


def bundled_folder(name: str) -> Path:
    """Where the bundled model ``name`` ships (read from the constants above when asked)."""
    return {"shapes": BUNDLED_SHAPES_MODEL, "shapes-xl": BUNDLED_SHAPES_XL_MODEL,
            "shapes-sd3": BUNDLED_SHAPES_SD3_MODEL}[name]


def shipped(name: str = "shapes") -> bool:
    """Whether this install ships the bundled model ``name`` (one of :data:`BUNDLED_NAMES`)."""
    return (bundled_folder(name) / "model_index.json").is_file()


def default_model() -> tuple[str, str | None]:
    """The model to use when none is named: ``(model, note)``.

    ``"shapes"``, the bundled ShapesWorld model, when this install ships it (``note`` is ``None``); otherwise
    ``"tiny"``, a random-weight test model, with a one-line ``note`` saying so, for the UI and the CLI to show.
    """
    if shipped("shapes"):
        return "shapes", None
    return "tiny", ("the bundled shapes model is not in this install, so the model is 'tiny': random weights "
                    "that show the pipeline works, not meaningful pictures; pass --model for a real one")


def _folder(model: str) -> Path:
    return bundled_folder(model) if model in BUNDLED_NAMES else Path(model).expanduser()


def recommended_settings(model: str, defaults: dict | None = None) -> dict:
    """The steps and guidance scale ``model`` is meant to be run with (``num_inference_steps``,
    ``guidance_scale``): those its folder's ``pfbdiff.json`` names, else ``defaults`` (the family's; default
    :data:`DEFAULT_RECOMMENDED`). Only local folders (and the bundled model) are read; a value that is not a
    positive number is ignored."""
    settings = dict(defaults or DEFAULT_RECOMMENDED)
    try:
        recommended = json.loads((_folder(model) / RECOMMENDED_FILE).read_text("utf-8"))
    except (OSError, ValueError, TypeError):
        return settings
    if not isinstance(recommended, dict):
        return settings
    for name, kind in (("num_inference_steps", int), ("guidance_scale", (int, float))):
        value = recommended.get(name)
        if isinstance(value, kind) and not isinstance(value, bool) and value > 0:
            settings[name] = value
    return settings


def training_steps(model: str) -> int | None:
    """The number of diffusion steps the model's scheduler was trained with, read from its config file when
    ``model`` is the bundled model or a local diffusers folder; ``None`` when that cannot be read yet."""
    folder = _folder(model)
    try:
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text("utf-8"))
        steps = config.get("num_train_timesteps", DEFAULT_TRAINING_STEPS)
    except (OSError, ValueError, AttributeError):
        return None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None
