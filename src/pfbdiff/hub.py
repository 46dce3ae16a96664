"""Hugging Face hub ids (``owner/name``) as local diffusers folders: the cache first, the network only if allowed.

:func:`local_snapshot` returns a complete snapshot folder of a Stable Diffusion repo, taken from the local
cache, or else downloaded unless the hub is switched off (:func:`hub_is_offline`, ``HF_HUB_OFFLINE=1``);
:func:`cached_snapshot` never touches the network. Only the files pfbdiff needs are fetched
(:func:`file_patterns`). Every way the hub can fail (offline, unreachable, gated, missing, incomplete) becomes
a one-line :class:`PFBDiffError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .diffusers_folders import (
    MODEL_HINT,
    PICKLE_WEIGHT_STEMS,
    SAFETENSORS_SUFFIX,
    WEIGHT_STEMS,
    diffusers_folder_problem,
)
from .errors import PFBDiffError


def hub_is_offline() -> bool:
    """Whether the user switched the hub off (read at call time, so a later ``HF_HUB_OFFLINE=1`` counts)."""
    from huggingface_hub import constants

    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def file_patterns(allow_pickle: bool, with_weights: bool) -> list[str]:
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


def cached_snapshot(repo_id: str, patterns: list[str]) -> Path | None:
    """The repo's snapshot folder from the local cache, or ``None``; never touches the network."""
    try:
        return _snapshot_download(repo_id, patterns, local_files_only=True)
    except (*_hub_errors(), ValueError):
        return None


def local_snapshot(repo_id: str, patterns: list[str], allow_pickle: bool) -> Path:
    """A complete local snapshot of ``repo_id``: from the cache, else downloaded unless the hub is offline."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    needs_weights = any(p.endswith(SAFETENSORS_SUFFIX) for p in patterns)

    def usable(folder: Path | None) -> bool:
        if folder is None:
            return False
        if needs_weights:
            return diffusers_folder_problem(folder, allow_pickle) is None
        return (folder / "model_index.json").is_file()

    cached = cached_snapshot(repo_id, patterns)
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
