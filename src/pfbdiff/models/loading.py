"""Turn what the user names with ``--model`` into Stable Diffusion components.

:func:`load_components` accepts, in this order of precedence:

1. a short name registered in :data:`MODEL_ALIASES` (maps to a local folder or file);
2. a local diffusers folder (``model_index.json`` with ``unet``/``vae``/``text_encoder``/``tokenizer``/
   ``scheduler`` subfolders; see :mod:`pfbdiff.models.diffusers_folders`);
3. a single-file checkpoint in the original CompVis/LDM key layout (``.safetensors``), together with
   ``config``: a diffusers folder (or cached hub id) that supplies the component configs, since a single file
   carries weights only;
4. a Hugging Face hub id ``owner/name``: the local cache is used first; the network is only tried when the
   hub is not switched off with ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` (see
   :mod:`pfbdiff.models.hub`).

Pickle files (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run arbitrary code when loaded, so they are refused
unless ``allow_pickle=True`` (and never loaded with ``use_safetensors=True``). Of diffusers' ``from_pretrained``
arguments, ``variant``, ``use_safetensors``, ``revision``, ``cache_dir`` and ``local_files_only`` are honoured;
any other is refused rather than silently ignored. Every mistake a user can make raises :class:`PFBDiffError`
with a one-line message that names the problem and the fix. The ``--device`` and ``--dtype`` options are
resolved by :mod:`pfbdiff.models.devices`. :func:`~pfbdiff.models.catalog.default_model` picks the model when none is named, and
:func:`~pfbdiff.pipeline.load_pipeline` loads a whole :class:`~pfbdiff.pipeline.PFBDiffPipeline`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from pfbdiff.errors import PFBDiffError, gist
from pfbdiff.models import catalog, hub
from pfbdiff.models.devices import resolve_device, resolve_dtype
from pfbdiff.models.diffusers_folders import (
    COMPONENT_NAMES,
    MODEL_HINT,
    SAFETENSORS_SUFFIX,
    SDXL_COMPONENT_NAMES,
    SUPPORTED,
    WEIGHTED_COMPONENTS,
    WeightChoice,
    flow_family,
    is_sdxl,
    load_diffusers_folder,
    load_flow_folder,
)


# Short model names mapped to a function that returns their local path. Consulted before anything else, so a
# registered name shadows a folder of the same name.
def _tiny_model() -> Path:
    from pfbdiff.models.toy_models import tiny_model_path

    return tiny_model_path()


def _bundled(name: str) -> Callable[[], Path]:
    """The folder of the bundled model ``name``, or a one-line error saying how to make it where it is missing."""
    def folder() -> Path:
        if not catalog.shipped(name):
            raise PFBDiffError(f"the bundled {name!r} model is not in this install ({catalog.bundled_folder(name)}); "
                               f"{catalog.TRAINING_HINTS[name]}, or pass --model with another model")
        return catalog.bundled_folder(name)

    return folder


MODEL_ALIASES: dict[str, Callable[[], Path]] = {"tiny": _tiny_model, **{name: _bundled(name) for name in catalog.BUNDLED_NAMES}}

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")

# Used as the config of a single-file checkpoint when none is given, if it happens to be in the local cache.
DEFAULT_SD1_CONFIG_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_SDXL_CONFIG_REPO = "stabilityai/stable-diffusion-xl-base-1.0"

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


# --------------------------------------------------------------------------------------------- entry point


def load_components(
    model: str | os.PathLike,
    *,
    torch_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    config: str | os.PathLike | None = None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    **unknown,
) -> dict:
    """Load ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` and ``scheduler`` for the model the user named.

    The three networks are put on ``device`` in ``torch_dtype`` and in eval mode with gradients off. See the
    module docstring for what ``model`` may be; ``config`` is only used for single-file checkpoints, and
    ``revision``, ``cache_dir`` and ``local_files_only`` only for hub ids. The other arguments mean what they
    mean to diffusers' ``from_pretrained``; ``unknown`` ones are refused, since ignoring them would quietly
    load something other than what was asked for.
    """
    _refuse_unknown(unknown)
    device = resolve_device(device)
    dtype = resolve_dtype(torch_dtype, device)
    weights = WeightChoice(allow_pickle=allow_pickle, variant=variant, use_safetensors=use_safetensors)
    path = _resolve_model_path(model, weights, revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only)

    if path.is_dir():
        load_folder = load_flow_folder if flow_family(path) else load_diffusers_folder
        components = load_folder(path, dtype, weights)
    else:
        components = _load_single_file(path, dtype, weights, config)
    return _prepare(components, device, dtype)


def _refuse_unknown(unknown: dict) -> None:
    """Name the arguments ``load_components`` does not know, and list those it does."""
    if not unknown:
        return
    parameters = inspect.signature(load_components).parameters.values()
    supported = ", ".join(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)
    raise PFBDiffError(
        f"unsupported model loading argument(s) {', '.join(map(repr, sorted(unknown)))}; supported: {supported}"
    )


def _prepare(components: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Keep the SD components (SDXL's extra ones too), on ``device`` in ``dtype``, ready for inference; an SD3 or
    Flux model keeps all of its own."""
    if "transformer" in components:
        return {name: value.to(device).eval().requires_grad_(False) if isinstance(value, torch.nn.Module) else value
                for name, value in components.items()}
    sdxl = components.get("text_encoder_2") is not None
    prepared = {name: components[name] for name in COMPONENT_NAMES + (SDXL_COMPONENT_NAMES if sdxl else ())}
    if "force_zeros_for_empty_prompt" in components:
        prepared["force_zeros_for_empty_prompt"] = components["force_zeros_for_empty_prompt"]
    for name in WEIGHTED_COMPONENTS + (("text_encoder_2",) if sdxl else ()):
        module = prepared[name]
        if module.dtype != dtype:  # loaders already give ``dtype``; cast only if one did not
            module = module.to(dtype=dtype)
        prepared[name] = module.to(device).eval().requires_grad_(False)
    return prepared


# --------------------------------------------------------------------------------------------- pipeline


@contextlib.contextmanager
def library_progress_bars_off():
    """Switch diffusers' and transformers' progress bars off, then back to what each was (a global setting)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    enabled = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was_enabled in zip(libraries, enabled):
            if was_enabled:
                library.enable_progress_bar()


# --------------------------------------------------------------------------------------------- what was named


def _resolve_model_path(model: str | os.PathLike, weights: WeightChoice, **hub_options) -> Path:
    """A local folder or file for ``model``: an alias, an existing path, or a hub id's snapshot.

    ``hub_options`` (``revision``, ``cache_dir``, ``local_files_only``) only matter for a hub id.
    """
    name = os.fspath(model)
    if name in MODEL_ALIASES:
        return Path(MODEL_ALIASES[name]())

    path = Path(name).expanduser()
    if path.exists():
        return path
    if _looks_like_hub_id(name):
        return hub.local_snapshot(name, weights, **hub_options)

    known = f" (known names: {', '.join(sorted(MODEL_ALIASES))})" if MODEL_ALIASES else ""
    raise PFBDiffError(
        f"model {name!r} not found: no such file or folder, and it is not a known model name{known} "
        f"or a hub id like owner/name; {MODEL_HINT}"
    )


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with hub-legal characters, and nothing that only a file path would have."""
    return bool(HUB_ID_PATTERN.match(name)) and not name.endswith((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))


# --------------------------------------------------------------------------------------------- single files


def _refuse_pickle(path: Path, weights: WeightChoice) -> None:
    raise PFBDiffError(
        f"'{path}' is a pickle checkpoint, which can run arbitrary code when loaded; {weights.pickle_fix()}"
    )


def _load_single_file(path: Path, dtype: torch.dtype, weights: WeightChoice, config) -> dict:
    """Load an original-layout SD checkpoint file, taking component configs from ``config``.

    ``weights.variant`` does not apply: a single file holds one set of weights.
    """
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not weights.pickle_allowed:
            _refuse_pickle(path, weights)
    elif suffix != SAFETENSORS_SUFFIX:
        raise PFBDiffError(
            f"'{path}' is neither a diffusers folder nor a .safetensors checkpoint; {MODEL_HINT}"
        )

    flow = _single_file_flow_family(path) if suffix == SAFETENSORS_SUFFIX else None
    if flow:
        return _load_flow_transformer_file(path, flow, dtype, weights, config)
    sdxl = _single_file_is_sdxl(path) if suffix == SAFETENSORS_SUFFIX else None  # a pickle: as its configs say
    config_folder = _resolve_config_folder(path, config, sdxl)
    if sdxl is None:
        sdxl = is_sdxl(config_folder)
    elif sdxl != is_sdxl(config_folder):
        kinds = ("an SDXL", "an SD 1.x/2.x") if sdxl else ("an SD 1.x/2.x", "an SDXL")
        raise PFBDiffError(f"'{path}' is {kinds[0]} checkpoint but --config '{config_folder}' is {kinds[1]} model "
                           "folder; pass the diffusers folder or hub id of a model of the checkpoint's family")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import SafetensorError

    family, loader, extra = (("SDXL", StableDiffusionXLPipeline, {}) if sdxl else
                             ("Stable Diffusion 1.x/2.x", StableDiffusionPipeline,
                              dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)))
    try:
        pipeline = loader.from_single_file(
            str(path),
            config=str(config_folder),
            local_files_only=True,
            # fp32 is what the file is usually stored in; asking for it anyway makes diffusers cast and warn
            torch_dtype=None if dtype == torch.float32 else dtype,
            **extra,
        )
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as err:
        raise PFBDiffError(
            f"could not load '{path}' with the configs of '{config_folder}' ({gist(err)}); check that the file "
            f"is a {family} checkpoint and that --config is the matching diffusers folder"
        ) from err
    components = pipeline.components
    if sdxl:
        components["force_zeros_for_empty_prompt"] = pipeline.config.force_zeros_for_empty_prompt
    return components


#: Weight names that only other families' single-file checkpoints have, and what to say of such a file.
_OTHER_FAMILY_KEYS = {
    "conditioner.embedders.0.model.text_projection": f"an SDXL refiner checkpoint; {SUPPORTED}: pass a base model",
}
#: Weight names of SD3's and Flux's transformers, in the original layout and in diffusers'.
_FLOW_KEYS = {"sd3": ("joint_blocks.", "context_embedder.weight"), "flux": ("double_blocks.", "single_transformer_blocks.")}
_FLOW_NAMES = {"sd3": "Stable Diffusion 3", "flux": "Flux"}


def _single_file_flow_family(path: Path) -> str | None:
    """``"sd3"`` or ``"flux"`` when the ``.safetensors`` file holds one of their transformers (read from its
    header), else ``None``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            names = list(checkpoint.keys())
    except (OSError, SafetensorError):
        return None
    if any(marker in key for key in names for marker in _FLOW_KEYS["flux"]):
        return "flux"
    if any(marker in key for key in names for marker in _FLOW_KEYS["sd3"]):
        return "sd3"
    return None


def _load_flow_transformer_file(path: Path, family: str, dtype: torch.dtype, weights: WeightChoice, config) -> dict:
    """An SD3 or Flux transformer file (what ComfyUI and the model makers ship as one file), with the other
    components and the transformer's config from ``config``, a diffusers folder of the same family."""
    name = _FLOW_NAMES[family]
    if config is None:
        raise PFBDiffError(f"'{path}' is a single-file {name} transformer, which holds no text encoders, VAE or "
                           f"configs; pass --config /path/to/a/{family}-diffusers-folder (or its hub id) to supply them")
    folder = Path(os.fspath(config)).expanduser()
    if not folder.is_dir() and _looks_like_hub_id(os.fspath(config)):
        folder = hub.local_snapshot(os.fspath(config), weights)
    if flow_family(folder) != family:
        raise PFBDiffError(f"'{path}' is a {name} transformer but --config '{config}' is not a {name} diffusers "
                           f"folder; pfbdiff takes the other components from the folder of the model the file was "
                           "made from: pass it")
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from safetensors import SafetensorError

    components = load_flow_folder(folder, dtype, weights)
    transformer_class = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    try:
        components["transformer"] = transformer_class.from_single_file(
            str(path), config=str(folder), subfolder="transformer", local_files_only=True,
            torch_dtype=None if dtype == torch.float32 else dtype)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as err:
        raise PFBDiffError(f"could not load '{path}' with the transformer config of '{folder}' ({gist(err)}); check "
                           f"that the file is a {name} transformer of the same size as --config's") from err
    return components
_SDXL_KEY = "conditioner.embedders.1."
_FIRST_UNET_CONV = "model.diffusion_model.input_blocks.0.0.weight"


def _single_file_is_sdxl(path: Path) -> bool | None:
    """Whether the ``.safetensors`` checkpoint is SDXL (else SD 1.x/2.x), read from its header (weight names and one
    shape); ``None`` when the header cannot be read (loading it says what is wrong). A family pfbdiff cannot edit
    is a one-line error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            names = list(checkpoint.keys())
            channels = checkpoint.get_slice(_FIRST_UNET_CONV).get_shape()[1] if _FIRST_UNET_CONV in names else 4
    except (OSError, SafetensorError):
        return None
    family = next((what for marker, what in _OTHER_FAMILY_KEYS.items() if any(marker in key for key in names)), None)
    if family:
        raise PFBDiffError(f"'{path}' is {family}")
    if channels != 4:
        raise PFBDiffError(f"'{path}' is an inpainting or depth checkpoint (its U-Net takes {channels} input "
                           f"channels); {SUPPORTED} whose U-Net takes the latent alone")
    return any(key.startswith(_SDXL_KEY) for key in names)


def _resolve_config_folder(checkpoint: Path, config, sdxl: bool | None) -> Path:
    """A local diffusers folder with the component configs a single-file checkpoint needs (when none is named:
    the SD 1.5 or SDXL base model, if it is in the local cache)."""
    if config is None:
        repo = DEFAULT_SDXL_CONFIG_REPO if sdxl else DEFAULT_SD1_CONFIG_REPO
        cached = hub.cached_snapshot(repo, hub.file_patterns(None))
        if cached is not None:
            return cached
        example = "SDXL base" if sdxl else "Stable Diffusion 1.5"
        raise PFBDiffError(
            f"'{checkpoint}' is a single-file checkpoint, which holds weights but no component configs; pass "
            f"--config /path/to/a/diffusers-folder (e.g. a saved {example} model) to supply them"
        )
    name = os.fspath(config)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise PFBDiffError(
                f"--config '{folder}' is not a diffusers model folder (no model_index.json); "
                "pass a folder written by save_pretrained, e.g. a Stable Diffusion 1.5 model"
            )
        return folder
    if not folder.exists() and _looks_like_hub_id(name):
        return hub.local_snapshot(name, None)
    raise PFBDiffError(f"--config '{name}' is not a folder; pass a local diffusers model folder")
