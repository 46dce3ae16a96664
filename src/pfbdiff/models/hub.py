"""Hugging Face hub ids (``owner/name``) as local diffusers folders: the cache first, the network only if allowed.

:func:`local_snapshot` returns a complete snapshot folder of a Stable Diffusion repo, taken from the local
cache, or else downloaded unless the hub is switched off (:func:`hub_is_offline`, ``HF_HUB_OFFLINE=1``) or the
caller passed ``local_files_only=True``; :func:`cached_snapshot` never touches the network. ``revision`` and
``cache_dir`` go to ``snapshot_download`` for cache lookups and downloads alike. Only the files pfbdiff needs
are fetched (:func:`file_patterns`). Every way the hub can fail (offline, unreachable, gated, missing, incomplete) becomes
a one-line :class:`PFBDiffError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pfbdiff.errors import PFBDiffError
from pfbdiff.models.diffusers_folders import (
    MODEL_HINT,
    PICKLE_WEIGHT_STEMS,
    SAFETENSORS_SUFFIX,
    WEIGHT_STEMS,
    WeightChoice,
    diffusers_folder_problem,
    family_problem,
)


def hub_is_offline() -> bool:
    """Whether the user switched the hub off (read at call time, so a later ``HF_HUB_OFFLINE=1`` counts)."""
    from huggingface_hub import constants

    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def file_patterns(weights: WeightChoice | None) -> list[str]:
    """Files of an SD repo that pfbdiff needs: configs, plus the weights ``weights`` asks for unless ``None``.

    Only one set of weights is fetched (the requested variant, else the plain files), never the safety checker
    or EMA weights: an SD repo holds several gigabytes of each.
    """
    patterns = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"]
    patterns += ["tokenizer/*", "scheduler/*", "text_encoder_2/config.json", "tokenizer_2/*"]  # SDXL's, if any
    patterns += ["transformer/config.json", "text_encoder_3/config.json", "tokenizer_3/*"]  # SD3's and Flux's
    if weights is None:
        return patterns
    stem_tables = [WEIGHT_STEMS] + ([PICKLE_WEIGHT_STEMS] if weights.pickle_allowed else [])
    suffixes = [SAFETENSORS_SUFFIX] + ([".bin"] if weights.pickle_allowed else [])
    for stems, suffix in zip(stem_tables, suffixes):
        for component, stem in stems.items():
            patterns += _weight_patterns(f"{component}/{stem}", suffix, weights.variant)
    return patterns


def _weight_patterns(stem: str, suffix: str, variant: str | None) -> list[str]:
    """Whole, index and shard files of one weight file, named as diffusers and transformers save a variant."""
    if variant is None:
        return [f"{stem}{suffix}", f"{stem}{suffix}.index.json", f"{stem}-*{suffix}"]
    return [f"{stem}.{variant}{suffix}", f"{stem}{suffix}.index.{variant}.json", f"{stem}.{variant}-*{suffix}"]


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


def _snapshot_download(repo_id: str, patterns: list[str], local_files_only: bool, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_files_only,
                                  revision=revision, cache_dir=cache_dir))


def cached_snapshot(repo_id: str, patterns: list[str], *, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The repo's snapshot folder from the local cache, or ``None``; never touches the network."""
    try:
        return _snapshot_download(repo_id, patterns, local_files_only=True, revision=revision, cache_dir=cache_dir)
    except (*_hub_errors(), ValueError):
        return None


def local_snapshot(repo_id: str, weights: WeightChoice | None, *, revision: str | None = None,
                   cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """A complete local snapshot of ``repo_id`` with the weights ``weights`` asks for (configs only if ``None``).

    It comes from the cache, else is downloaded unless the hub is offline or ``local_files_only`` is set.
    """
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = file_patterns(weights)
    where = {"revision": revision, "cache_dir": cache_dir}

    def usable(folder: Path | None) -> bool:
        if folder is None:
            return False
        if weights is not None:
            return diffusers_folder_problem(folder, weights) is None
        return (folder / "model_index.json").is_file()

    cached = cached_snapshot(repo_id, patterns, **where)
    if usable(cached):
        return cached
    family = family_problem(cached) if cached is not None else None
    if family:  # no download can make it editable
        raise PFBDiffError(family)

    name = repo_id if revision is None else f"{repo_id}@{revision}"
    if local_files_only:
        raise PFBDiffError(
            f"model '{name}' is not in the local Hugging Face cache and local_files_only=True forbids downloading "
            f"it; download it first, or {MODEL_HINT}"
        )
    unreachable = (
        f"model '{name}' is not in the local Hugging Face cache and the hub cannot be reached; "
        f"download it where there is internet, or {MODEL_HINT}"
    )
    if hub_is_offline():
        raise PFBDiffError(unreachable)
    try:
        downloaded = _snapshot_download(repo_id, patterns, local_files_only=False, **where)
    except GatedRepoError as err:
        raise PFBDiffError(
            f"model '{repo_id}' is gated on the hub; accept its license on huggingface.co and log in with "
            f"`hf auth login`, or {MODEL_HINT}"
        ) from err
    except RepositoryNotFoundError as err:
        raise PFBDiffError(
            f"model '{repo_id}' does not exist on the hub (or is private); check the name, or {MODEL_HINT}"
        ) from err
    except RevisionNotFoundError as err:
        raise PFBDiffError(
            f"model '{repo_id}' has no revision {revision!r} on the hub; pass an existing branch, tag or commit"
        ) from err
    except (*_hub_errors(), ValueError) as err:
        raise PFBDiffError(unreachable) from err
    if not usable(downloaded):
        problem = diffusers_folder_problem(downloaded, weights or WeightChoice())
        raise PFBDiffError(f"model '{name}' on the hub is not a usable Stable Diffusion diffusers model: {problem}")
    return downloaded
