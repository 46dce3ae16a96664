"""The batch manifest: JSONL, one edit per line, read into validated :class:`BatchLine` objects.

A manifest has one edit per line (blank lines and lines starting with ``#`` are ignored)::

    {"image": "cat.png", "mask": "cat-mask.png", "source_prompt": "a cat on a bench", "prompt": "a dog",
     "output": "dog.png", "seed": 1, "steps": 30, "preset": "object", "inside": ["dog"]}

Keys: ``image``, ``prompt`` and ``mask`` (required; ``mask`` may be left out with ``"auto_mask": true``);
``source_prompt``, ``preset``, ``inside``/``outside`` (a list or a comma-separated string), ``seed``, ``steps``,
``guidance`` (or ``guidance_scale``), ``negative_prompt``, ``strength``, ``grow``, ``paste_back``, ``feather``,
``crop`` (``"auto"``, true, false), ``crop_padding``, ``auto_mask``, ``auto_mask_threshold``, ``output`` (a
``.png`` name relative to ``--out``; default ``line-NNNN.png``) and any :class:`~pfbdiff.engine.presets.EditConfig`
field (``"t_combine": 200``) — the options of ``pfbdiff edit``. Image and mask paths are relative to the
manifest's folder and may not leave it. An unknown key is an error naming the known ones, so a typo is not
silently ignored. Each line becomes a :class:`~pfbdiff.apps.provenance.EditRequest`, and its JSON record is the
one ``pfbdiff edit --save-json`` writes, so ``pfbdiff edit --from-json OUT/NAME.json -o again.png`` replays it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pfbdiff.apps import provenance
from pfbdiff.apps.request import SETTING_NAMES, EditRequest
from pfbdiff.engine.presets import FAMILY_PRESETS, EditConfig
from pfbdiff.errors import PFBDiffError
from pfbdiff.io.images import check_readable_file, one_line

#: Keys of a manifest line that are EditRequest fields (model, device and dtype are the batch's own).
REQUEST_KEYS = (
    "image", "mask", "prompt", "source_prompt", "preset", "inside", "outside", "steps", "guidance_scale",
    "negative_prompt", "seed", "paste_back", "feather", "crop", "crop_padding", "auto_mask", "auto_mask_threshold",
)
#: Other spellings, as on the command line and in diffusers.
KEY_ALIASES = {"guidance": "guidance_scale", "num_inference_steps": "steps", "negative": "negative_prompt"}
LINE_KEYS = (*REQUEST_KEYS, "output", "settings")


@dataclass
class BatchLine:
    """One valid manifest line: the edit request with every default filled in, and where it goes."""

    line_no: int
    request: EditRequest  # image and mask are absolute paths; model is filled in when the batch runs
    output: str  # relative POSIX path under --out, ends in .png
    config: EditConfig  # the preset with the request's settings applied
    image_digest: str
    mask_digest: str | None

    # shorthands
    @property
    def image(self) -> Path:
        return Path(self.request.image)

    @property
    def mask(self) -> Path | None:
        return Path(self.request.mask) if self.request.mask else None

    @property
    def record_name(self) -> str:
        return str(PurePosixPath(self.output).with_suffix(".json"))

    @property
    def sharing_key(self) -> tuple:
        """Lines with the same key may share an inversion (they do when their edited boxes match too)."""
        r = self.request
        return (self.image_digest, r.source_prompt, r.steps, self.config.strength, repr(r.crop), r.crop_padding)

    def request_for(self, model: str) -> EditRequest:
        return dataclasses.replace(self.request, model=model)

    def parameters_hash(self, model: str) -> str:
        """A hash of everything that decides the output's pixels (file contents, not their paths).

        The preset is hashed as every model family resolves it (``FAMILY_PRESETS``): the manifest is read before
        the model, whose family decides which one runs, so a change to any family's version of a preset makes
        the line's earlier output stale."""
        request = self.request_for(model)
        decisive = {**request.to_dict(), "adapter_sha256": provenance.adapter_digests(request)}
        effective = {str(family): _jsonable(dataclasses.asdict(request.config_for(family)))
                     for family in (None, *FAMILY_PRESETS)}
        decisive.update(image=self.image_digest, mask=self.mask_digest, device=None, dtype=None, effective=effective)
        return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class BadLine:
    """A manifest line that cannot be run, and why."""

    line_no: int
    reason: str
    output: str | None = None


def json_key(parameter: str) -> str:
    """How a manifest line names a parameter in a message: as its JSON key, ``"steps"``, ``"guidance"``."""
    return f'"{"guidance" if parameter == "guidance_scale" else parameter}"'


def read_manifest(path: str | os.PathLike, *, steps: int | None = None, guidance: float | None = None, model: str = "",
                  adapters: dict | None = None) -> tuple[list[BatchLine], list[BadLine]]:
    """Parse and check every line of the manifest at ``path`` without loading a model.

    ``steps`` and ``guidance`` are the defaults for lines that do not set them (``None``: the model's recommended
    ones); ``model`` is the batch's model, when
    known, which a line is checked against as far as its files allow (steps within its training steps), and
    ``adapters`` its LoRAs and embeddings (:func:`~pfbdiff.apps.request.adapter_fields`). A missing or unreadable manifest
    is a :class:`PFBDiffError`; a bad line is returned as a :class:`BadLine` (the rest still run).
    """
    manifest = Path(path).expanduser()
    if not manifest.is_file():
        raise PFBDiffError(f"manifest not found: {manifest}; pass a .jsonl file with one edit per line")
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is not part of line 1
    except (OSError, UnicodeDecodeError) as error:
        raise PFBDiffError(f"cannot read manifest {manifest} ({one_line(str(error))}); it must be UTF-8 JSONL") from None
    folder = manifest.resolve().parent
    lines: list[BatchLine] = []
    bad: list[BadLine] = []
    outputs: dict[str, int] = {}
    digests: dict[Path, str] = {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            entry = _parse_line(raw, line_no, folder, steps, guidance, model, adapters or {}, digests)
        except PFBDiffError as error:
            bad.append(BadLine(line_no, str(error), _output_name_or_none(raw, line_no)))
            continue
        key = entry.output.lower()  # one file on case-insensitive disks too
        if key in outputs:
            bad.append(BadLine(line_no, f"output {entry.output} is also the output of line {outputs[key]}; "
                                        "give each line its own \"output\" name", entry.output))
            continue
        outputs[key] = line_no
        lines.append(entry)
    if not lines and not bad:
        raise PFBDiffError(f"manifest {manifest} has no edits; write one JSON object per line")
    return lines, bad


def _parse_line(raw: str, line_no: int, folder: Path, steps: int | None, guidance: float | None, model: str, adapters: dict,
                digests: dict) -> BatchLine:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise PFBDiffError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise PFBDiffError(f"a line must be a JSON object {{\"image\": ..., \"mask\": ..., \"prompt\": ...}}, "
                           f"got {type(data).__name__}")
    data = {KEY_ALIASES.get(k, k): v for k, v in data.items()}
    unknown = sorted(set(data) - set(LINE_KEYS) - set(SETTING_NAMES))
    if unknown:
        hint = " (the model, device and dtype are options of `pfbdiff batch`)" if {"model", "device", "dtype"} & set(unknown) else ""
        raise PFBDiffError(f"unknown key(s) {', '.join(map(repr, unknown))}{hint}; known keys: "
                           f"{', '.join(LINE_KEYS)} and the settings of `pfbdiff presets`")
    for required in ("image", "prompt") + (() if data.get("auto_mask") is True else ("mask",)):
        if required not in data:
            raise PFBDiffError(f"missing \"{required}\"" + (" (or set \"auto_mask\": true)" if required == "mask" else ""))
    image = _input_path(data["image"], folder, "image")
    mask = _input_path(data["mask"], folder, "mask") if data.get("mask") is not None else None
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise PFBDiffError(f"\"settings\" must be an object of method settings, got {settings!r}")
    fields = {k: v for k, v in data.items() if k in REQUEST_KEYS}
    fields.update(image=str(image), mask=str(mask) if mask else None,
                  settings={**settings, **{k: v for k, v in data.items() if k in SETTING_NAMES}})
    fields.setdefault("steps", steps)
    fields.setdefault("guidance_scale", guidance)
    try:
        request = EditRequest.checked(model=model, **adapters, **fields)
    except PFBDiffError as error:
        raise PFBDiffError(one_line(error.naming(json_key))) from None
    return BatchLine(
        line_no=line_no, request=request, output=_output_name(data.get("output"), line_no),
        config=request.edit_config, image_digest=_digest(image, digests),
        mask_digest=_digest(mask, digests) if mask else None,
    )


def _input_path(value, folder: Path, name: str) -> Path:
    """A path relative to the manifest's folder that must stay inside it (symlinks resolved)."""
    if not isinstance(value, str) or not value.strip():
        raise PFBDiffError(f"\"{name}\" must be a file path (a string), got {value!r}")
    resolved = (folder / Path(value).expanduser()).resolve()
    if not resolved.is_relative_to(folder):
        raise PFBDiffError(f"{name} path {value!r} leads outside the manifest's folder {folder}; "
                           "keep inputs in that folder or below it")
    check_readable_file(resolved, name)
    return resolved


def _output_name(value, line_no: int) -> str:
    """A relative ``.png`` path under --out: no absolute paths, no ``..``, no hidden names."""
    if value is None:
        return f"line-{line_no:04d}.png"
    if not isinstance(value, str) or not value.strip():
        raise PFBDiffError(f"\"output\" must be a file name such as \"dog.png\", got {value!r}")
    name = PurePosixPath(value.replace("\\", "/"))
    if name.is_absolute() or re.match(r"^[A-Za-z]:", value) or any(p in ("..", ".") for p in name.parts):
        raise PFBDiffError(f"output {value!r} must be a plain relative name inside --out (no '/...' or '..')")
    if any(p.startswith(".") for p in name.parts):
        raise PFBDiffError(f"output {value!r} must not be a hidden name (starting with '.')")
    if name.suffix.lower() != ".png":
        raise PFBDiffError(f"output {value!r} must end in .png (PNG is lossless and keeps the edit's settings)")
    return str(name)


def _output_name_or_none(raw: str, line_no: int) -> str | None:
    try:
        data = json.loads(raw)
        return _output_name(data.get("output"), line_no) if isinstance(data, dict) else None
    except (json.JSONDecodeError, PFBDiffError):
        return None


def _digest(path: Path, cache: dict) -> str:
    if path not in cache:
        cache[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return cache[path]


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
