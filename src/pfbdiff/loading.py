"""Turn what the user names with ``--model`` into Stable Diffusion components.

:func:`load_components` accepts, in this order of precedence:

1. a short name registered in :data:`MODEL_ALIASES` (maps to a local folder or file);
2. a local diffusers folder (``model_index.json`` with ``unet``/``vae``/``text_encoder``/``tokenizer``/
   ``scheduler`` subfolders);
3. a single-file checkpoint in the original CompVis/LDM key layout (``.safetensors``), together with
   ``config``: a diffusers folder (or cached hub id) that supplies the component configs, since a single file
   carries weights only;
4. a Hugging Face hub id ``owner/name``: the local cache is used first; the network is only tried when the
   hub is not switched off with ``HF_HUB_OFFLINE=1``.

Pickle files (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run arbitrary code when loaded, so they are refused
unless ``allow_pickle=True``. Every mistake a user can make raises :class:`PFBDiffError` with a one-line
message that names the problem and the fix.

The helpers :func:`best_device`, :func:`resolve_device` and :func:`resolve_dtype` turn the ``--device`` and
``--dtype`` options into torch objects.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import PFBDiffError

#: Where the bundled ShapesWorld model ships (a diffusers folder), when it does.
BUNDLED_SHAPES_MODEL = Path(__file__).parent / "shapes" / "model"
SHAPES_TRAINING_HINT = ("train and export it with `python -m pfbdiff.shapes.train --out runs/shapes --stage all "
                        "--export-dir src/pfbdiff/shapes/model`")


# Short model names mapped to a function that returns their local path. Consulted before anything else, so a
# registered name shadows a folder of the same name.
def _tiny_model() -> Path:
    from .toy_models import tiny_model_path

    return tiny_model_path()


def _shapes_model() -> Path:
    if not (BUNDLED_SHAPES_MODEL / "model_index.json").is_file():
        raise PFBDiffError(f"the bundled shapes model is not in this install ({BUNDLED_SHAPES_MODEL}); "
                           f"{SHAPES_TRAINING_HINT}, or pass --model with another model")
    return BUNDLED_SHAPES_MODEL


MODEL_ALIASES: dict[str, Callable[[], Path]] = {"tiny": _tiny_model, "shapes": _shapes_model}

COMPONENT_NAMES = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"

# Used as the config of a single-file checkpoint when none is given, if it happens to be in the local cache.
DEFAULT_SD1_CONFIG_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
MODEL_HINT = "pass --model /path/to/a/diffusers-folder or /path/to/model.safetensors"

# Weight file stems of each component in a diffusers folder (transformers and diffusers name them differently).
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
PICKLE_WEIGHT_STEMS = {**WEIGHT_STEMS, "text_encoder": "pytorch_model"}


# --------------------------------------------------------------------------------------------- device and dtype


def best_device() -> torch.device:
    """The fastest available device: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn ``None``/``"auto"``/``"cpu"``/``"cuda"``/``"cuda:N"``/``"mps"`` into an available torch device."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return best_device()
    try:
        resolved = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as err:
        raise PFBDiffError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from err

    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PFBDiffError(
                f"device {device!r} was asked for but CUDA is not available (no GPU visible or a CPU-only torch); "
                "use --device cpu or install a CUDA build of torch"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise PFBDiffError(
                f"device {device!r} does not exist: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "use --device cuda:0"
            )
    elif resolved.type == "mps":
        if not _mps_available():
            raise PFBDiffError(f"device {device!r} was asked for but MPS is not available; use --device cpu")
    elif resolved.type != "cpu":
        raise PFBDiffError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return resolved


DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> torch.dtype:
    """Turn a dtype name into a torch dtype; ``None``/``"auto"`` means fp16 on GPUs and fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise PFBDiffError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    if dtype is None or dtype.strip().lower() == "auto":
        device_type = resolve_device(device).type
        return torch.float16 if device_type in ("cuda", "mps") else torch.float32
    name = dtype.strip().lower().removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise PFBDiffError(f"unknown dtype {dtype!r}; use auto, float32 (fp32), float16 (fp16) or bfloat16 (bf16)")
    return DTYPE_NAMES[name]


# --------------------------------------------------------------------------------------------- entry point


def load_components(
    model: str | os.PathLike,
    *,
    torch_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    config: str | os.PathLike | None = None,
) -> dict:
    """Load ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` and ``scheduler`` for the model the user named.

    The three networks are put on ``device`` in ``torch_dtype`` and in eval mode with gradients off. See the
    module docstring for what ``model`` may be; ``config`` is only used for single-file checkpoints.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(torch_dtype, device)
    path = _resolve_model_path(model, allow_pickle)

    if path.is_dir():
        components = _load_diffusers_folder(path, dtype, allow_pickle)
    else:
        components = _load_single_file(path, dtype, allow_pickle, config)
    return _prepare(components, device, dtype)


def _prepare(components: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Keep the five SD components, on ``device`` in ``dtype``, ready for inference."""
    prepared = {name: components[name] for name in COMPONENT_NAMES}
    for name in WEIGHTED_COMPONENTS:
        module = prepared[name]
        if module.dtype != dtype:  # loaders already give ``dtype``; cast only if one did not
            module = module.to(dtype=dtype)
        prepared[name] = module.to(device).eval().requires_grad_(False)
    return prepared


# --------------------------------------------------------------------------------------------- what was named


def _resolve_model_path(model: str | os.PathLike, allow_pickle: bool) -> Path:
    """A local folder or file for ``model``: an alias, an existing path, or a hub id's cached snapshot."""
    name = os.fspath(model)
    if name in MODEL_ALIASES:
        return Path(MODEL_ALIASES[name]())

    path = Path(name).expanduser()
    if path.exists():
        return path
    if _looks_like_hub_id(name):
        return _hub_snapshot(name, _hub_patterns(allow_pickle, with_weights=True), allow_pickle)

    known = f" (known names: {', '.join(sorted(MODEL_ALIASES))})" if MODEL_ALIASES else ""
    raise PFBDiffError(
        f"model {name!r} not found: no such file or folder, and it is not a known model name{known} "
        f"or a hub id like owner/name; {MODEL_HINT}"
    )


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with hub-legal characters, and nothing that only a file path would have."""
    return bool(HUB_ID_PATTERN.match(name)) and not name.endswith((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))


# --------------------------------------------------------------------------------------------- diffusers folders


def _weight_files(folder: Path, component: str, suffix: str) -> list[Path]:
    """The component's weight files with ``suffix`` (plain, sharded, or a variant such as fp16)."""
    subfolder = folder / component
    if not subfolder.is_dir():
        return []
    return sorted(p for p in subfolder.iterdir() if p.is_file() and p.name.endswith(suffix))


def _diffusers_folder_problem(folder: Path, allow_pickle: bool) -> str | None:
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
        if _weight_files(folder, component, SAFETENSORS_SUFFIX):
            continue
        if _weight_files(folder, component, ".bin"):
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
    names = [p.name for p in _weight_files(folder, component, suffix)]
    if any(n == stem + suffix or n.startswith(stem + "-") or n == stem + suffix + ".index.json" for n in names):
        return None
    for name in names:
        parts = name[: -len(suffix)].split(".")
        if len(parts) == 2 and parts[0] == stem:
            return parts[1]
    return None


def _load_diffusers_folder(folder: Path, dtype: torch.dtype, allow_pickle: bool) -> dict:
    """Load the five components from a local diffusers folder, refusing pickle weights unless allowed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    problem = _diffusers_folder_problem(folder, allow_pickle)
    if problem:
        raise PFBDiffError(problem)

    def weight_kwargs(component: str) -> dict:
        has_safetensors = bool(_weight_files(folder, component, SAFETENSORS_SUFFIX))
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


# --------------------------------------------------------------------------------------------- single files


def _refuse_pickle(path: Path) -> None:
    raise PFBDiffError(
        f"'{path}' is a pickle checkpoint, which can run arbitrary code when loaded; "
        "convert it to .safetensors or pass --allow-pickle if you trust its source"
    )


def _load_single_file(path: Path, dtype: torch.dtype, allow_pickle: bool, config) -> dict:
    """Load an original-layout SD checkpoint file, taking component configs from ``config``."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            _refuse_pickle(path)
    elif suffix != SAFETENSORS_SUFFIX:
        raise PFBDiffError(
            f"'{path}' is neither a diffusers folder nor a .safetensors checkpoint; {MODEL_HINT}"
        )

    config_folder = _resolve_config_folder(path, config)
    from diffusers import StableDiffusionPipeline

    try:
        pipeline = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config_folder),
            local_files_only=True,
            # fp32 is what the file is usually stored in; asking for it anyway makes diffusers cast and warn
            torch_dtype=None if dtype == torch.float32 else dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise PFBDiffError(
            f"could not load '{path}' with the configs of '{config_folder}' ({_gist(err)}); check that the file "
            "is a Stable Diffusion 1.x checkpoint and that --config is a matching SD 1.x diffusers folder"
        ) from err
    return pipeline.components


def _gist(err: BaseException, limit: int = 160) -> str:
    """The first sentence of a library error, short enough to quote inside a one-line message."""
    text = " ".join(str(err).split()) or type(err).__name__
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def _resolve_config_folder(checkpoint: Path, config) -> Path:
    """A local diffusers folder with the component configs a single-file checkpoint needs."""
    if config is None:
        cached = _cached_snapshot(DEFAULT_SD1_CONFIG_REPO, _hub_patterns(allow_pickle=False, with_weights=False))
        if cached is not None:
            return cached
        raise PFBDiffError(
            f"'{checkpoint}' is a single-file checkpoint, which holds weights but no component configs; pass "
            "--config /path/to/a/diffusers-folder (e.g. a saved Stable Diffusion 1.5 model) to supply them"
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
        return _hub_snapshot(name, _hub_patterns(allow_pickle=False, with_weights=False), allow_pickle=True)
    raise PFBDiffError(f"--config '{name}' is not a folder; pass a local diffusers model folder")


# --------------------------------------------------------------------------------------------- the hub


def hub_is_offline() -> bool:
    """Whether the user switched the hub off (read at call time, so a later ``HF_HUB_OFFLINE=1`` counts)."""
    from huggingface_hub import constants

    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _hub_patterns(allow_pickle: bool, with_weights: bool) -> list[str]:
    """Files of an SD repo that pfbdiff needs (not the safety checker, fp16 copies or EMA weights)."""
    patterns = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"]
    patterns += ["tokenizer/*", "scheduler/*"]
    if not with_weights:
        return patterns
    stem_tables = [WEIGHT_STEMS] + ([PICKLE_WEIGHT_STEMS] if allow_pickle else [])
    suffixes = [SAFETENSORS_SUFFIX] + ([".bin"] if allow_pickle else [])
    for stems, suffix in zip(stem_tables, suffixes):
        for component, stem in stems.items():
            patterns += [f"{component}/{stem}{suffix}", f"{component}/{stem}{suffix}.index.json"]
            patterns += [f"{component}/{stem}-*{suffix}"]  # shards
    return patterns


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the hub could not give us the files" (HTTP clients differ between versions)."""
    errors: list[type[BaseException]] = [OSError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        base = getattr(module, "HTTPError", None) if module_name != "requests" else module.RequestException
        if isinstance(base, type):
            errors.append(base)
    return tuple(errors)


def _snapshot_download(repo_id: str, patterns: list[str], local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_files_only))


def _cached_snapshot(repo_id: str, patterns: list[str]) -> Path | None:
    """The repo's snapshot folder from the local cache, or ``None``; never touches the network."""
    try:
        return _snapshot_download(repo_id, patterns, local_files_only=True)
    except (*_hub_errors(), ValueError):
        return None


def _hub_snapshot(repo_id: str, patterns: list[str], allow_pickle: bool) -> Path:
    """A complete local snapshot of ``repo_id``: from the cache, else downloaded unless the hub is offline."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    needs_weights = any(p.endswith(SAFETENSORS_SUFFIX) for p in patterns)

    def usable(folder: Path | None) -> bool:
        if folder is None:
            return False
        if needs_weights:
            return _diffusers_folder_problem(folder, allow_pickle) is None
        return (folder / "model_index.json").is_file()

    cached = _cached_snapshot(repo_id, patterns)
    if usable(cached):
        return cached

    unreachable = (
        f"model '{repo_id}' is not in the local Hugging Face cache and the hub cannot be reached; "
        f"download it where there is internet, or {MODEL_HINT}"
    )
    if hub_is_offline():
        raise PFBDiffError(unreachable)
    try:
        downloaded = _snapshot_download(repo_id, patterns, local_files_only=False)
    except GatedRepoError as err:
        raise PFBDiffError(
            f"model '{repo_id}' is gated on the hub; accept its license on huggingface.co and log in with "
            f"`hf auth login`, or {MODEL_HINT}"
        ) from err
    except RepositoryNotFoundError as err:
        raise PFBDiffError(
            f"model '{repo_id}' does not exist on the hub (or is private); check the name, or {MODEL_HINT}"
        ) from err
    except (*_hub_errors(), ValueError) as err:
        raise PFBDiffError(unreachable) from err
    if not usable(downloaded):
        pickle_hint = "" if allow_pickle else "pass --allow-pickle if you trust its .bin weights, "
        raise PFBDiffError(
            f"model '{repo_id}' on the hub is not a complete Stable Diffusion 1.x diffusers model with "
            f"{'' if allow_pickle else 'safetensors '}weights; {pickle_hint}or {MODEL_HINT}"
        )
    return downloaded


# --------------------------------------------------------------------------------------------- default model


def default_model() -> tuple[str, str | None]:
    """The model to use when none is named: ``(model, note)``.

    ``"shapes"``, the bundled ShapesWorld model, when this install ships it (``note`` is ``None``); otherwise
    ``"tiny"``, a random-weight test model, with a one-line ``note`` saying so, for the UI and the CLI to show.
    """
    if (BUNDLED_SHAPES_MODEL / "model_index.json").is_file():
        return "shapes", None
    return "tiny", ("the bundled shapes model is not in this install, so the model is 'tiny': random weights "
                    "that show the pipeline works, not meaningful pictures; pass --model for a real one")
