"""A local Stable Diffusion model in the diffusers folder layout: what it must hold, and loading it.

A diffusers folder (written by ``save_pretrained``, or a hub snapshot) has a ``model_index.json`` and one
subfolder per component (:data:`COMPONENT_NAMES`); the three networks (:data:`WEIGHTED_COMPONENTS`) keep their
weights as ``<stem>.safetensors``, sharded, or as a variant such as ``<stem>.fp16.safetensors``.
:func:`diffusers_folder_problem` says in one line why a folder cannot be used (pickle ``.bin`` weights are
refused unless allowed), and :func:`load_diffusers_folder` loads its five components without the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import PFBDiffError

COMPONENT_NAMES = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
SAFETENSORS_SUFFIX = ".safetensors"

# Weight file stems of each component in a diffusers folder (transformers and diffusers name them differently).
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
PICKLE_WEIGHT_STEMS = {**WEIGHT_STEMS, "text_encoder": "pytorch_model"}

#: How to name a local model instead: the end of every message about a model that cannot be found or used.
MODEL_HINT = "pass --model /path/to/a/diffusers-folder or /path/to/model.safetensors"


def weight_files(folder: Path, component: str, suffix: str) -> list[Path]:
    """The component's weight files with ``suffix`` (plain, sharded, or a variant such as fp16)."""
    subfolder = folder / component
    if not subfolder.is_dir():
        return []
    return sorted(p for p in subfolder.iterdir() if p.is_file() and p.name.endswith(suffix))


def diffusers_folder_problem(folder: Path, allow_pickle: bool) -> str | None:
    """Why ``folder`` cannot be loaded as a Stable Diffusion diffusers folder, or ``None`` if it can."""
    if not (folder / "model_index.json").is_file():
        return (
            f"folder '{folder}' is not a diffusers model (no model_index.json); "
            "pass a folder written by save_pretrained, or a .safetensors checkpoint with --config"
        )
    missing = [name for name in COMPONENT_NAMES if not (folder / name).is_dir()]
    if missing:
        return (
            f"diffusers folder '{folder}' lacks the subfolder(s) {', '.join(missing)}; "
            "pfbdiff needs a complete Stable Diffusion 1.x model (unet, vae, text_encoder, tokenizer, scheduler)"
        )
    for component in WEIGHTED_COMPONENTS:
        if weight_files(folder, component, SAFETENSORS_SUFFIX):
            continue
        if weight_files(folder, component, ".bin"):
            if allow_pickle:
                continue
            return (
                f"'{folder / component}' has only pickle (.bin) weights, which can run arbitrary code when loaded; "
                "convert them to .safetensors or pass --allow-pickle if you trust their source"
            )
        return f"'{folder / component}' has no weights (.safetensors); re-save or re-download the model"
    return None


def _variant(folder: Path, component: str, suffix: str) -> str | None:
    """The weight variant to ask for (e.g. ``"fp16"``) when a folder holds only ``name.fp16.suffix`` files."""
    stem = (WEIGHT_STEMS if suffix == SAFETENSORS_SUFFIX else PICKLE_WEIGHT_STEMS)[component]
    names = [p.name for p in weight_files(folder, component, suffix)]
    if any(n == stem + suffix or n.startswith(stem + "-") or n == stem + suffix + ".index.json" for n in names):
        return None
    for name in names:
        parts = name[: -len(suffix)].split(".")
        if len(parts) == 2 and parts[0] == stem:
            return parts[1]
    return None


def load_diffusers_folder(folder: Path, dtype: torch.dtype, allow_pickle: bool) -> dict:
    """Load the five components from a local diffusers folder, refusing pickle weights unless allowed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    problem = diffusers_folder_problem(folder, allow_pickle)
    if problem:
        raise PFBDiffError(problem)

    def weight_kwargs(component: str) -> dict:
        has_safetensors = bool(weight_files(folder, component, SAFETENSORS_SUFFIX))
        suffix = SAFETENSORS_SUFFIX if has_safetensors else ".bin"
        return {
            "subfolder": component,
            # True forbids pickle outright; None lets the library prefer safetensors but fall back to .bin
            "use_safetensors": True if has_safetensors or not allow_pickle else None,
            "variant": _variant(folder, component, suffix),
            "local_files_only": True,
        }

    return {
        "unet": UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype, **weight_kwargs("unet")),
        "vae": AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, **weight_kwargs("vae")),
        "text_encoder": CLIPTextModel.from_pretrained(folder, dtype=dtype, **weight_kwargs("text_encoder")),
        "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
        "scheduler": _load_scheduler(folder),
    }


def _load_scheduler(folder: Path):
    """The scheduler saved in the folder, built from the class its config names."""
    import diffusers

    config_path = folder / "scheduler" / "scheduler_config.json"
    if not config_path.is_file():
        raise PFBDiffError(f"'{config_path}' is missing; re-save or re-download the model")
    class_name = json.loads(config_path.read_text("utf-8")).get("_class_name", "DDIMScheduler")
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None or not issubclass(scheduler_class, diffusers.SchedulerMixin):
        raise PFBDiffError(f"'{config_path}' names an unknown scheduler {class_name!r}; use a diffusers scheduler")
    return scheduler_class.from_pretrained(folder, subfolder="scheduler")
