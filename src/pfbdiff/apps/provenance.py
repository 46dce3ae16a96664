"""Provenance: every output carries the record that made it, and the record makes it again.

An edit is described by an :class:`~pfbdiff.apps.request.EditRequest`: the input files, the prompts and
words, the model, the preset and every setting, the seed, and how the result is put back (paste-back, feather,
crop, auto-mask). :func:`~pfbdiff.apps.request.run_request` is the one function that turns a request into an
image; every front end and :func:`~pfbdiff.apps.request.replay` go through it, so a replayed record runs exactly
the same calls.

The *record* (:func:`make_record`) is the request plus what the run found out: the crop box, the size, the
U-Net calls, whether the inversion was reused, the effective strength and start, the SHA-256 of the input image and mask, the device and dtype
the model ran in, and the versions of Python, pfbdiff, torch, diffusers, transformers, numpy and Pillow.
It is written into the output PNG (``pfbdiff`` text chunk) and, with ``--save-json``, next to it.

Replaying (:func:`~pfbdiff.apps.request.replay`, ``pfbdiff edit --from-json record.json -o again.png``) checks that the input files
still have the recorded digests, loads the recorded model on the recorded device and dtype, and runs the
request: on the same machine and library versions the pixels are identical. ``allow_pickle`` is never taken
from a record (a record from someone else must not be able to run a pickle); pass it yourself.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path

from pfbdiff.errors import PFBDiffError
from pfbdiff.io import images as imgs
from pfbdiff.models import catalog

#: Version of the record layout; bumped when fields change meaning.
RECORD_VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the pixels."""
    import diffusers
    import numpy
    import PIL
    import torch
    import transformers

    from pfbdiff import __version__

    return {"python": platform.python_version(), "pfbdiff": __version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_reference(model: str) -> str:
    """A model name that still points at the same model from another folder: local paths made absolute
    (a registered short name such as ``shapes`` is kept: it shadows any folder of that name)."""
    if model in catalog.SHORT_NAMES:
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def make_record(request, config, pipe, result, size, *, image_sha256: str, unet_calls: int,
                shared_inversion: bool, changed_outside_mask: int | None = None,
                kept_inside_mask: int | None = None) -> dict:
    """The request (an :class:`~pfbdiff.apps.request.EditRequest`) plus the run's findings, versions and input
    digests, JSON-ready; ``config`` is the request's resolved :class:`~pfbdiff.engine.presets.EditConfig`.
    ``changed_outside_mask`` / ``kept_inside_mask``: pixels outside the user's mask that the edit changed (halo snap,
    grow) and pixels in it that it left as they were (inner halo; ``request.region_against_mask``)."""
    record = {"record_version": RECORD_VERSION, "pfbdiff_version": library_versions()["pfbdiff"]}
    record.update(request.to_dict())
    record.update(
        strength=config.strength, start=config.start, grow=config.grow, size=list(size),
        crop_box=list(result.crop_box) if result.crop_box is not None else None, unet_calls=unet_calls,
        shared_inversion=shared_inversion, changed_outside_mask=changed_outside_mask,
        kept_inside_mask=kept_inside_mask, image_sha256=image_sha256,
        mask_sha256=file_sha256(request.mask) if request.mask else None,
        adapter_sha256=adapter_digests(request),
        device=str(pipe.denoiser.device), dtype=str(pipe.denoiser.dtype).replace("torch.", ""),
        versions=library_versions(),
    )
    return record


def load_record(path: str | Path) -> dict:
    """A record from a JSON file written by ``--save-json`` or from the metadata of a pfbdiff PNG."""
    from pfbdiff.io.outputs import read_png_metadata

    path = Path(path).expanduser()
    imgs.check_readable_file(path, "record")
    if path.suffix.lower() == ".png":
        record = read_png_metadata(path)
        if not record:
            raise PFBDiffError(f"{path} carries no pfbdiff record; pass a PNG written by pfbdiff or its JSON record")
        return record
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PFBDiffError(f"{path} is not a JSON record ({imgs.one_line(str(error))})") from None
    if not isinstance(record, dict):
        raise PFBDiffError(f"{path} is not a JSON record (expected an object)")
    return record


def adapter_digests(request) -> dict:
    """SHA-256 of every LoRA and embedding file of ``request``, by path (they decide the pixels like the model).
    A file is read once while it keeps its size and modification time: a batch asks for every line."""
    digests = {}
    for item in [*request.loras, *request.embeddings]:
        status = os.stat(item["path"])
        digests[item["path"]] = _remembered_sha256(item["path"], status.st_size, status.st_mtime_ns)
    return digests


@functools.lru_cache(maxsize=64)
def _remembered_sha256(path: str, size: int, modified_ns: int) -> str:
    return file_sha256(path)


def check_inputs(record: dict) -> None:
    """The record's input files (and LoRA / embedding files) must still exist and have the recorded SHA-256."""
    files = [(key, record.get(key), record.get(f"{key}_sha256")) for key in ("image", "mask")]
    files += [("LoRA or embedding", path, digest) for path, digest in (record.get("adapter_sha256") or {}).items()]
    for what, path, expected in files:
        if not path:
            continue
        imgs.check_readable_file(Path(path), what)
        if expected and file_sha256(path) != expected:
            raise PFBDiffError(f"the {what} file {path} has changed since the record was written (SHA-256 differs); "
                               "the result would differ")
