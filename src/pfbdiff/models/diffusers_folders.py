"""A local Stable Diffusion model in the diffusers folder layout: what it must hold, and loading it.

A diffusers folder (written by ``save_pretrained``, or a hub snapshot) has a ``model_index.json`` and one
subfolder per component (:data:`COMPONENT_NAMES`); the three networks (:data:`WEIGHTED_COMPONENTS`) keep their
weights as ``<stem>.safetensors``, sharded, or as a variant such as ``<stem>.fp16.safetensors``.
:class:`WeightChoice` says which of those files may be loaded; :func:`diffusers_folder_problem` says in one
line why a folder cannot be used (pickle ``.bin`` weights are refused unless allowed, a requested variant may
be missing), and :func:`load_diffusers_folder` loads its five components without the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pfbdiff.errors import PFBDiffError, gist

COMPONENT_NAMES = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
#: What SDXL has besides: a second, projecting text encoder and its tokenizer.
SDXL_COMPONENT_NAMES = ("text_encoder_2", "tokenizer_2")
SAFETENSORS_SUFFIX = ".safetensors"

# Weight file stems of each component in a diffusers folder (transformers and diffusers name them differently).
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model", "transformer": "diffusion_pytorch_model", "text_encoder_3": "model"}
PICKLE_WEIGHT_STEMS = {**WEIGHT_STEMS, "text_encoder": "pytorch_model", "text_encoder_2": "pytorch_model",
                       "text_encoder_3": "pytorch_model"}
#: diffusers pipeline classes of the flow-matching transformers pfbdiff edits, and the family each is.
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "PFBDiffSD3Pipeline": "sd3",
                  "FluxPipeline": "flux", "PFBDiffFluxPipeline": "flux"}

#: How to name a local model instead: the end of every message about a model that cannot be found or used.
MODEL_HINT = "pass --model /path/to/a/diffusers-folder or /path/to/model.safetensors"


@dataclass(frozen=True)
class WeightChoice:
    """Which weight files of a diffusers model may be loaded (the diffusers arguments of the same names).

    ``variant`` (e.g. ``"fp16"``) asks for ``<stem>.<variant>.safetensors`` files; ``use_safetensors=True``
    forbids pickle weights even when ``allow_pickle`` is set.
    """

    allow_pickle: bool = False
    variant: str | None = None
    use_safetensors: bool | None = None

    @property
    def pickle_allowed(self) -> bool:
        return self.allow_pickle and not self.use_safetensors

    def pickle_fix(self) -> str:
        """How to get past refused pickle weights, as the end of an error message."""
        if self.allow_pickle:  # so use_safetensors=True is what refused them
            return "convert to .safetensors, or drop use_safetensors=True if you trust the source"
        return "convert to .safetensors or pass --allow-pickle if you trust the source"


def weight_stem(component: str, suffix: str) -> str:
    """The file name stem of the component's weights (transformers names pickle weights differently)."""
    return (WEIGHT_STEMS if suffix == SAFETENSORS_SUFFIX else PICKLE_WEIGHT_STEMS)[component]


def weight_files(folder: Path, component: str, suffix: str) -> list[Path]:
    """The component's weight files with ``suffix`` (plain, sharded, or a variant such as fp16)."""
    subfolder = folder / component
    if not subfolder.is_dir():
        return []
    return sorted(p for p in subfolder.iterdir() if p.is_file() and p.name.endswith(suffix))


def variant_files(folder: Path, component: str, suffix: str, variant: str | None) -> list[Path]:
    """The component's weight files of ``variant`` (whole or sharded); with no variant, all its weight files."""
    files = weight_files(folder, component, suffix)
    if variant is None:
        return files
    stem = f"{weight_stem(component, suffix)}.{variant}"
    return [p for p in files if p.name == stem + suffix or p.name.startswith(stem + "-")]


#: What pfbdiff edits today, for the messages that refuse the rest.
SUPPORTED = "pfbdiff edits Stable Diffusion 1.x, 2.x, SDXL, SD3 and Flux.1 text-to-image models"
#: diffusers pipeline classes of the families pfbdiff cannot edit yet, by the name users know them.
OTHER_FAMILIES = {"StableDiffusion3": "a Stable Diffusion 3 variant",
                  "Flux": "a Flux variant", "PixArt": "a PixArt model", "Sana": "a Sana model",
                  "HunyuanDiT": "a HunyuanDiT model", "Kandinsky": "a Kandinsky model", "Wuerstchen": "a Würstchen model",
                  "StableCascade": "a Stable Cascade model", "Lumina": "a Lumina model", "AuraFlow": "an AuraFlow model"}


def family_problem(folder: Path) -> str | None:
    """Why the diffusers model in ``folder`` is of a family pfbdiff cannot edit (read from its config files
    only), or ``None``: SD3, Flux and other transformers, SDXL refiners, and U-Nets that take more than a latent
    (inpainting, depth)."""
    try:
        index = json.loads((folder / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None  # the folder checks say what is wrong with it
    pipeline = str(index.get("_class_name", ""))
    if pipeline in FLOW_PIPELINES:
        return None
    family = next((name for prefix, name in OTHER_FAMILIES.items() if pipeline.startswith(prefix)), None)
    if family is None and "transformer" in index:
        family = f"a {pipeline or 'diffusion transformer'} model"
    if family is None and "text_encoder_2" in index and not (index.get("text_encoder") or [None])[0]:
        family = "an SDXL refiner (it has no first text encoder)"
    if family is not None:
        return f"'{folder}' is {family} ({pipeline}); {SUPPORTED}: pass a base text-to-image model"
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    channels = unet.get("in_channels", 4)
    if channels != unet.get("out_channels", 4):
        return (f"'{folder}' is an inpainting or depth model (its U-Net takes {channels} input channels); "
                f"{SUPPORTED} whose U-Net takes the latent alone: pass the base model it was made from")
    return None


def is_sdxl(folder: Path) -> bool:
    """Whether the folder's model_index.json names SDXL's second text encoder."""
    try:
        return "text_encoder_2" in json.loads((folder / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False


def flow_family(folder: Path) -> str | None:
    """``"sd3"`` or ``"flux"`` for a folder of a flow-matching transformer pfbdiff edits, else ``None``."""
    try:
        return FLOW_PIPELINES.get(json.loads((folder / "model_index.json").read_text("utf-8")).get("_class_name"))
    except (OSError, ValueError, AttributeError):
        return None


def _flow_components(folder: Path) -> tuple[str, ...]:
    """The components a flow model's model_index.json names (its optional image encoder aside)."""
    index = json.loads((folder / "model_index.json").read_text("utf-8"))
    return tuple(name for name, value in index.items()
                 if not name.startswith("_") and isinstance(value, list) and None not in value
                 and name not in ("image_encoder", "feature_extractor"))


def component_names(folder: Path) -> tuple[str, ...]:
    if flow_family(folder):
        return _flow_components(folder)
    return COMPONENT_NAMES + (SDXL_COMPONENT_NAMES if is_sdxl(folder) else ())


def weighted_components(folder: Path) -> tuple[str, ...]:
    if flow_family(folder):
        return tuple(name for name in _flow_components(folder) if name in WEIGHT_STEMS)
    return WEIGHTED_COMPONENTS + (("text_encoder_2",) if is_sdxl(folder) else ())


def diffusers_folder_problem(folder: Path, weights: WeightChoice) -> str | None:
    """Why ``folder`` cannot be loaded as a Stable Diffusion diffusers folder, or ``None`` if it can."""
    if not (folder / "model_index.json").is_file():
        return (
            f"folder '{folder}' is not a diffusers model (no model_index.json); "
            "pass a folder written by save_pretrained, or a .safetensors checkpoint with --config"
        )
    family = family_problem(folder)
    if family:
        return family
    missing = [name for name in component_names(folder) if not (folder / name).is_dir()]
    if missing:
        return (
            f"diffusers folder '{folder}' lacks the subfolder(s) {', '.join(missing)}; "
            "pfbdiff needs a complete model (for SD: unet, vae, text_encoder, tokenizer, scheduler; for SDXL "
            "also text_encoder_2, tokenizer_2; for SD3 and Flux every component its model_index.json names)"
        )
    for component in weighted_components(folder):
        problem = _component_weights_problem(folder, component, weights)
        if problem:
            return problem
    return None


def _component_weights_problem(folder: Path, component: str, weights: WeightChoice) -> str | None:
    """Why the component has no weights that ``weights`` lets us load, or ``None`` if it has."""
    variant = weights.variant
    if variant_files(folder, component, SAFETENSORS_SUFFIX, variant):
        return None
    if variant_files(folder, component, ".bin", variant):
        if weights.pickle_allowed:
            return None
        return (
            f"'{folder / component}' has only pickle (.bin) weights, which can run arbitrary code when loaded; "
            f"{weights.pickle_fix()}"
        )
    if variant is not None:
        return (
            f"'{folder / component}' has no {variant!r} variant of its weights "
            f"({weight_stem(component, SAFETENSORS_SUFFIX)}.{variant}.safetensors); "
            "pass a variant the model has, or none"
        )
    return f"'{folder / component}' has no weights (.safetensors); re-save or re-download the model"


def _variant(folder: Path, component: str, suffix: str) -> str | None:
    """The weight variant to ask for (e.g. ``"fp16"``) when a folder holds only ``name.fp16.suffix`` files."""
    stem = weight_stem(component, suffix)
    names = [p.name for p in weight_files(folder, component, suffix)]
    if any(n == stem + suffix or n.startswith(stem + "-") or n == stem + suffix + ".index.json" for n in names):
        return None
    for name in names:
        parts = name[: -len(suffix)].split(".")
        if len(parts) == 2 and parts[0] == stem:
            return parts[1]
    return None


def load_diffusers_folder(folder: Path, dtype: torch.dtype, weights: WeightChoice) -> dict:
    """Load the components from a local diffusers folder (five, and SDXL's second text encoder and tokenizer),
    with the weight files ``weights`` allows."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    problem = diffusers_folder_problem(folder, weights)
    if problem:
        raise PFBDiffError(problem)

    def weight_kwargs(component: str) -> dict:
        has_safetensors = bool(variant_files(folder, component, SAFETENSORS_SUFFIX, weights.variant))
        suffix = SAFETENSORS_SUFFIX if has_safetensors else ".bin"
        return {
            "subfolder": component,
            # True forbids pickle outright; None lets the library prefer safetensors but fall back to .bin
            "use_safetensors": True if has_safetensors or not weights.pickle_allowed else None,
            "variant": weights.variant or _variant(folder, component, suffix),
            "local_files_only": True,
        }

    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype, **weight_kwargs("unet")),
        "vae": lambda: AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, **weight_kwargs("vae")),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(folder, dtype=dtype, **weight_kwargs("text_encoder")),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
        "scheduler": lambda: _load_scheduler(folder),
    }
    sdxl = is_sdxl(folder)
    if sdxl:
        loaders["text_encoder_2"] = lambda: CLIPTextModelWithProjection.from_pretrained(
            folder, dtype=dtype, **weight_kwargs("text_encoder_2"))
        loaders["tokenizer_2"] = lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2",
                                                                       local_files_only=True)
    components = {component: _damage_named(folder, component, load) for component, load in loaders.items()}
    if sdxl:
        index = json.loads((folder / "model_index.json").read_text("utf-8"))
        components["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", True))
    return components


def load_flow_folder(folder: Path, dtype: torch.dtype, weights: WeightChoice) -> dict:
    """The components of a local SD3 or Flux diffusers folder, loaded by diffusers' pipeline of the family with
    the weight files ``weights`` allows (checked first, so a refusal is one line)."""
    from pfbdiff.flow_pipeline import PFBDiffFluxPipeline, PFBDiffSD3Pipeline

    problem = diffusers_folder_problem(folder, weights)
    if problem:
        raise PFBDiffError(problem)
    pipeline_class = PFBDiffSD3Pipeline if flow_family(folder) == "sd3" else PFBDiffFluxPipeline
    pipeline = _damage_named(folder, "components", lambda: pipeline_class.from_pretrained(
        folder, dtype=dtype, local_files_only=True, variant=weights.variant,
        use_safetensors=None if weights.pickle_allowed else True))
    return {name: value for name, value in pipeline.components.items() if value is not None}


def _damage_named(folder: Path, component: str, load):
    """``load()``, with a damaged or truncated file (bad JSON, a cut-off weights file) reported in one line."""
    from safetensors import SafetensorError

    try:
        return load()
    except PFBDiffError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise PFBDiffError(f"cannot load the {component} of '{folder}' ({gist(error)}); its files are damaged or "
                           "incomplete: download or save the model again") from error


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
