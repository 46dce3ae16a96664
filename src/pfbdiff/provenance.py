"""Provenance: every output carries the record that made it, and the record makes it again.

An edit is described by an :class:`EditRequest`: the input files, the prompts and words, the model, the
preset and every setting, the seed, and how the result is put back (paste-back, feather, crop, auto-mask).
:func:`run_edit` is the one function that turns a request into an image; the ``edit`` command and
:func:`replay` both go through it, so a replayed record runs exactly the same calls.

The *record* (:func:`make_record`) is the request plus what the run found out: the crop box, the size, the
U-Net calls, the effective strength and start, the SHA-256 of the input image and mask, the device and dtype
the model ran in, and the versions of Python, pfbdiff, torch, diffusers, transformers, numpy and Pillow.
It is written into the output PNG (``pfbdiff`` text chunk) and, with ``--save-json``, next to it.

Replaying (:func:`replay`, ``pfbdiff edit --from-json record.json -o again.png``) checks that the input files
still have the recorded digests, loads the recorded model on the recorded device and dtype, and runs the
request: on the same machine and library versions the pixels are identical. ``allow_pickle`` is never taken
from a record (a record from someone else must not be able to run a pickle); pass it yourself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import images as imgs
from .errors import PFBDiffError

#: Version of the record layout; bumped when fields change meaning.
RECORD_VERSION = 1


@dataclass
class EditRequest:
    """Everything that decides an edit's pixels (besides the machine and the library versions)."""

    image: str
    prompt: str
    mask: str | None = None
    source_prompt: str = ""
    preset: str = "object"
    inside: list = field(default_factory=list)
    outside: list = field(default_factory=list)
    steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    seed: int = 0
    model: str = "tiny"
    config: str | None = None
    device: str | None = None
    dtype: str | None = None
    settings: dict = field(default_factory=dict)  # EditConfig overrides (strength, start, grow, --set ...)
    paste_back: bool = True
    feather: int | None = None
    crop: Any = "auto"  # "auto", True or False
    crop_padding: int | None = None
    auto_mask: bool = False
    auto_mask_threshold: float = 0.5

    @classmethod
    def from_record(cls, record: dict) -> "EditRequest":
        """The request inside a record (unknown keys, such as the run's findings, are ignored)."""
        version = record.get("record_version", RECORD_VERSION)
        if version > RECORD_VERSION:
            raise PFBDiffError(f"the record has layout version {version}, newer than this pfbdiff ({RECORD_VERSION}); "
                               "upgrade pfbdiff to replay it")
        names = {f.name for f in dataclasses.fields(cls)}
        if not record.get("image") or not isinstance(record.get("prompt"), str):
            raise PFBDiffError("the record names no image or prompt; pass a JSON record or PNG written by pfbdiff")
        values = {k: v for k, v in record.items() if k in names}
        values["settings"] = {k: tuple(v) if isinstance(v, list) else v for k, v in (values.get("settings") or {}).items()}
        return cls(**values)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings.items()}
        return data


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the pixels."""
    import diffusers
    import numpy
    import PIL
    import torch
    import transformers

    from . import __version__

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
    from .loading import MODEL_ALIASES

    if model in MODEL_ALIASES:
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def run_edit(request: EditRequest, pipe, *, source=None, mask=None, inversion_callback=None,
             callback_on_step_end=None):
    """Run ``request`` on ``pipe``; returns ``(PFBDiffOutput, record)``.

    ``source`` / ``mask`` may be passed already loaded (the CLI checks them before loading the model); they
    must be what :func:`~pfbdiff.images.load_image` / ``load_mask`` make of the request's files.
    """
    import torch

    source = imgs.load_image(request.image) if source is None else source
    if mask is None and request.mask is not None:
        mask = imgs.load_mask(request.mask, source.size)
    result = pipe(
        source, mask, request.prompt, request.source_prompt, preset=request.preset,
        num_inference_steps=request.steps, inside=tuple(request.inside) or None,
        outside=tuple(request.outside) or None, guidance_scale=request.guidance_scale,
        negative_prompt=request.negative_prompt or None, generator=torch.Generator().manual_seed(request.seed),
        callback_on_step_end=callback_on_step_end, inversion_callback=inversion_callback,
        paste_back=request.paste_back, feather=request.feather, crop=request.crop, crop_padding=request.crop_padding,
        auto_mask=request.auto_mask, auto_mask_threshold=request.auto_mask_threshold, **request.settings,
    )
    return result, make_record(request, pipe, result, source.size)


def make_record(request: EditRequest, pipe, result, size) -> dict:
    """The request plus the run's findings, versions and input digests (JSON-ready)."""
    from .presets import get_preset

    effective = get_preset(request.preset, **request.settings)
    record = {"record_version": RECORD_VERSION, "pfbdiff_version": library_versions()["pfbdiff"]}
    record.update(request.to_dict())
    record.update(
        strength=effective.strength, start=effective.start, grow=effective.grow, size=list(size),
        crop_box=list(result.crop_box) if result.crop_box is not None else None, unet_calls=pipe.unet_calls,
        image_sha256=file_sha256(request.image),
        mask_sha256=file_sha256(request.mask) if request.mask else None,
        device=str(pipe.unet.device), dtype=str(pipe.unet.dtype).replace("torch.", ""),
        versions=library_versions(),
    )
    return record


def load_record(path: str | Path) -> dict:
    """A record from a JSON file written by ``--save-json`` or from the metadata of a pfbdiff PNG."""
    from .outputs import read_png_metadata

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


def check_inputs(record: dict) -> None:
    """The record's input files must still exist and have the recorded SHA-256."""
    for key in ("image", "mask"):
        path, expected = record.get(key), record.get(f"{key}_sha256")
        if not path:
            continue
        imgs.check_readable_file(Path(path), key)
        if expected and file_sha256(path) != expected:
            raise PFBDiffError(f"the {key} file {path} has changed since the record was written (SHA-256 differs); "
                               "the result would differ")


def replay(record: dict | str | Path, *, pipe=None, allow_pickle: bool = False):
    """Make the image of ``record`` (a dict, or a JSON / PNG path) again; returns ``(PFBDiffOutput, record)``.

    ``pipe`` defaults to the recorded model loaded on the recorded device and dtype.
    """
    if not isinstance(record, dict):
        record = load_record(record)
    request = EditRequest.from_record(record)
    check_inputs(record)
    if pipe is None:
        from .pipeline import PFBDiffPipeline

        pipe = PFBDiffPipeline.from_pretrained(request.model, torch_dtype=request.dtype, device=request.device,
                                               allow_pickle=allow_pickle, config=request.config)
        pipe.set_progress_bar_config(disable=True)
    return run_edit(request, pipe)
