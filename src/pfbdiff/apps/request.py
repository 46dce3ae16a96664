"""One edit request: the single path from any front end to pixels and a record.

The command line's options, a manifest line, the web page's form and a replayed record all become an
:class:`EditRequest`. :meth:`EditRequest.checked` validates every field once, in library terms (errors name the
field; each face renders it as a flag, a JSON key or a form label); :attr:`EditRequest.edit_config` resolves the
preset and its settings once into an :class:`~pfbdiff.engine.presets.EditConfig`. :func:`load_inputs` reads the
photo and the mask before any model is loaded; :func:`run_request` runs the request on a pipeline, taking the
inversion from an :class:`InversionCache` when an earlier request inverted the same photo the same way; and
:func:`pfbdiff.apps.provenance.make_record` records it with one schema. :func:`replay` runs a record again.

    request = EditRequest.checked(image="cat.png", mask="cat-mask.png", prompt="a dog", source_prompt="a cat")
    inputs = load_inputs(request)                      # user mistakes surface here, before the model loads
    outcome = run_request(request, pipe, inputs)       # outcome.result.images[0], outcome.record
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfbdiff import checks
from pfbdiff.apps import provenance
from pfbdiff.engine.presets import EditConfig, get_preset
from pfbdiff.errors import EmptyMaskError, PFBDiffError
from pfbdiff.io import images as imgs
from pfbdiff.models import catalog

#: The method settings a request may override (``inside``/``outside`` are the request's own word lists).
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(EditConfig) if f.name not in ("inside", "outside"))


def _default_model() -> str:
    return catalog.default_model()[0]


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
    steps: int | None = None  # None: the model's recommended steps (catalog.recommended_settings), filled in by checked()
    guidance_scale: float | None = None  # None: the model's recommended guidance scale, likewise
    negative_prompt: str = ""
    seed: int = 0
    model: str = field(default_factory=_default_model)
    config: str | None = None  # configs folder of a single-file checkpoint
    device: str | None = None
    dtype: str | None = None
    settings: dict = field(default_factory=dict)  # EditConfig overrides (strength, start, grow, t_combine, ...)
    paste_back: bool = True
    feather: int | None = None
    crop: Any = "auto"  # "auto", True or False
    crop_padding: int | None = None
    auto_mask: bool = False
    auto_mask_threshold: float = 0.5
    loras: list = field(default_factory=list)  # [{"path", "scale"}]: part of the model, applied when it loads
    embeddings: list = field(default_factory=list)  # [{"path", "token"}]: textual-inversion embeddings

    # -- building and checking ---------------------------------------------------------------------------------
    @classmethod
    def checked(cls, **values) -> "EditRequest":
        """A request from field values of any front end, each checked and normalised; unknown names are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise PFBDiffError(f"unknown request field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values = {k: v for k, v in values.items() if v is not None or k in ("mask", "feather", "crop_padding")}
        for name in ("image", "prompt"):
            if name not in values:
                raise PFBDiffError.about(name, "is required")
        recommended = catalog.recommended_settings(values.get("model") or _default_model())
        values.setdefault("steps", recommended["num_inference_steps"])
        values.setdefault("guidance_scale", recommended["guidance_scale"])
        rules = {
            "image": _path, "mask": _optional(_path), "prompt": _text, "source_prompt": _text,
            "negative_prompt": _text, "preset": _preset, "inside": words, "outside": words, "steps": checks.steps,
            "guidance_scale": checks.finite_number, "seed": checks.seed, "model": _text, "config": _optional(_text),
            "device": _optional(_text), "dtype": _optional(_text), "settings": _settings, "paste_back": _flag,
            "feather": _optional(checks.pixels), "crop": _crop, "crop_padding": _optional(checks.pixels),
            "auto_mask": _flag, "auto_mask_threshold": checks.unit_threshold, "loras": _loras,
            "embeddings": _embeddings,
        }
        request = cls(**{name: rules[name](name, value) for name, value in values.items()})
        if not request.prompt.strip():
            raise PFBDiffError.about("prompt", "is empty; say what the edited region should show, e.g. 'a dog'")
        if request.mask is None and not request.auto_mask:
            raise PFBDiffError.about("mask", "is required (white = region to change), unless auto_mask finds the region")
        checks.steps("steps", request.steps, catalog.training_steps(request.model))  # when its files tell
        request.edit_config  # the settings must make a valid EditConfig
        return request

    @classmethod
    def from_record(cls, record: dict) -> "EditRequest":
        """The request inside a record, checked like any other (the run's findings are ignored)."""
        version = record.get("record_version", provenance.RECORD_VERSION)
        if not isinstance(version, int) or version > provenance.RECORD_VERSION:
            raise PFBDiffError(f"the record has layout version {version!r}, newer than this pfbdiff "
                               f"({provenance.RECORD_VERSION}); upgrade pfbdiff to replay it")
        if not record.get("image") or not isinstance(record.get("prompt"), str):
            raise PFBDiffError("the record names no image or prompt; pass a JSON record or PNG written by pfbdiff")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.checked(**{k: v for k, v in record.items() if k in names})

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings.items()}
        return data

    # -- what it resolves to -----------------------------------------------------------------------------------
    def config_for(self, family: str | None) -> EditConfig:
        """The preset as a pipeline of ``family`` runs it (its ``preset_family``), with the request's settings and
        words applied: the one resolution of ``preset``."""
        config = get_preset(self.preset, family, **self.settings)
        words = {k: tuple(getattr(self, k)) for k in ("inside", "outside") if getattr(self, k)}
        return config.replace(**words) if words else config

    @functools.cached_property
    def edit_config(self) -> EditConfig:
        """:meth:`config_for` a U-Net, for what is the same on every family: the checks of the settings, the mask's
        reach, how the photo is inverted (a request is not changed after :meth:`checked`; ``dataclasses.replace``
        makes a new one)."""
        return self.config_for(None)

    def edit_steps(self) -> int:
        """K: the steps that are inverted and edited."""
        from pfbdiff.engine.sampling import edit_steps

        return edit_steps(self.steps, self.edit_config.strength)


# ------------------------------------------------------------------------------------------------ field rules


def _optional(check):
    return lambda name, value: None if value is None else check(name, value)


def _text(name, value) -> str:
    if not isinstance(value, str):
        raise PFBDiffError.about(name, f"must be text, got {value!r}")
    return value


def _path(name, value) -> str:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise PFBDiffError.about(name, f"must be a file path, got {value!r}")
    return value


def _preset(name, value) -> str:
    get_preset(value)  # the one "unknown preset" message
    return value


def _flag(name, value) -> bool:
    if not isinstance(value, bool):
        raise PFBDiffError.about(name, f"must be true or false, got {value!r}")
    return value


def _crop(name, value):
    if value not in ("auto", True, False) or (value in (0, 1) and not isinstance(value, bool)):
        raise PFBDiffError.about(name, f'must be "auto", true or false, got {value!r}')
    return value


def adapter_fields(loras=(), embeddings=()) -> dict:
    """``loras`` and ``embeddings`` as a request holds them (checked, paths absolute), for faces that load the
    model once for many requests (batch, the web UI)."""
    return {"loras": _loras("loras", list(loras)), "embeddings": _embeddings("embeddings", list(embeddings))}


def _loras(name, value) -> list[dict]:
    """LoRAs as ``"FILE[:SCALE]"`` texts or ``{"path", "scale"}`` objects (scale 1 by default)."""
    return [_adapter(name, item, "scale") for item in _listed(name, value)]


def _embeddings(name, value) -> list[dict]:
    """Embeddings as ``"FILE[:TOKEN]"`` texts or ``{"path", "token"}`` objects (token: from the file)."""
    return [_adapter(name, item, "token") for item in _listed(name, value)]


def _listed(name, value) -> list:
    if not isinstance(value, (list, tuple)):
        raise PFBDiffError.about(name, f"must be a list of files, got {value!r}")
    return list(value)


def _adapter(name, item, extra: str) -> dict:
    if isinstance(item, str):
        path, sep, tail = item.rpartition(":")
        if not sep or (extra == "scale" and not _is_number(tail)) or (extra == "token" and (not tail or "/" in tail)):
            path, tail = item, None  # no suffix (a colon of a path, e.g. C:\)
        item = {"path": path, extra: float(tail) if extra == "scale" and tail is not None else tail}
    if not isinstance(item, dict) or set(item) - {"path", extra} or not isinstance(item.get("path"), str):
        raise PFBDiffError.about(name, f"must name files as \"FILE[:{extra.upper()}]\" or {{\"path\", \"{extra}\"}}, "
                                       f"got {item!r}")
    value = item.get(extra)
    if extra == "scale":
        value = checks.finite_number(name, 1.0 if value is None else value)
    elif value is not None and not isinstance(value, str):
        raise PFBDiffError.about(name, f"token must be text such as \"<my-style>\", got {value!r}")
    return {"path": str(Path(item["path"]).expanduser().resolve()), extra: value}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def words(name, value) -> list[str]:
    """Words from a comma-separated text or a list of texts: ``"red hat, cat"`` or ``["red hat", "cat"]``."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(w, str) for w in items):
        raise PFBDiffError.about(name, f"must be a list of words or a comma-separated text, got {value!r}")
    return [w.strip() for item in items for w in item.split(",") if w.strip()]


def _settings(name, value) -> dict:
    if not isinstance(value, dict):
        raise PFBDiffError.about(name, f"must be an object of method settings, got {value!r}")
    return {key: setting_value(key, v) for key, v in value.items()}


def setting_value(key: str, value):
    """A method setting's value checked against the type of its default; text (from ``--set KEY=TEXT``) is read
    as that type first. Lists become tuples."""
    fields = EditConfig.__dataclass_fields__
    if key not in SETTING_NAMES:
        raise PFBDiffError(f"unknown setting {key!r}; choose one of: {', '.join(SETTING_NAMES)}")
    default = fields[key].default
    if isinstance(value, str) and value.strip().lower() == "none" and (default is None or key == "auto_words"):
        return None  # the settings that may be switched off
    if isinstance(value, str) and not isinstance(default, str) and key != "auto_words":
        value = _read_text(key, value, default)
    if isinstance(value, list):
        value = tuple(value)
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (tuple,)}
    expected = kinds.get(type(default))
    if expected and (not isinstance(value, expected) or (isinstance(value, bool) and type(default) is not bool)):
        raise PFBDiffError(f"setting {key!r} must be like its default {default!r}, got {value!r}")
    return checks.finite_number(key, value) if isinstance(value, float) else value


def setting_text(value) -> str:
    """A setting's value written as ``--set KEY=TEXT`` takes it: ``8,9,13``, ``true``, ``none``, ``0.8``."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(item) for item in value)
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _read_text(key: str, text: str, default):
    text = text.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, (tuple, type(None))):
            parts = [p.strip() for p in text.split(",") if p.strip()]
            return tuple(int(p) if p.lstrip("-").isdigit() else p for p in parts)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, int):
            return int(text)
    except ValueError:
        raise PFBDiffError(f"setting {key}={text}: cannot read {text!r} as the type of {key} "
                           f"({type(default).__name__})") from None
    return text


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Inputs:
    """The request's photo and mask, loaded and checked."""

    source: Any  # PIL image
    mask: Any  # H×W float array in [0, 1], or None (auto-mask without a bound)


def load_inputs(request: EditRequest) -> Inputs:
    """Read the photo and the mask; an all-black mask is an :class:`EmptyMaskError` (nothing to edit)."""
    source = imgs.load_image(request.image)
    config = request.edit_config
    checks.within_photo(source.size, grow=config.grow, halo=config.halo, feather=request.feather,
                        crop_padding=request.crop_padding)
    mask = imgs.load_mask(request.mask, source.size) if request.mask is not None else None
    if mask is not None and imgs.mask_extent(mask) == "empty":
        raise EmptyMaskError("the mask is all black: nothing to edit; paint the region to change in white")
    return Inputs(source, mask)


class InversionCache:
    """The most recent inversions, keyed by :func:`inversion_key`: what an inversion depends on."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple):
        if key in self._items:
            self._items.move_to_end(key)
        return self._items.get(key)

    def put(self, key: tuple, inversion) -> None:
        self._items[key] = inversion
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def inversion_key(image_digest: str, request: EditRequest, plan) -> tuple:
    """Two requests may share an inversion when these agree: the photo's bytes, the source prompt, the step grid,
    K, the crop plan (the inverted box and the size the model sees it at), and how it was inverted (SDXL's size
    ids, a flow's solver)."""
    config = request.edit_config
    return (image_digest, request.source_prompt, request.steps, request.edit_steps(),
            tuple(plan.box.as_list()), tuple(plan.model_size), config.size_ids, config.flow_solver)


@dataclass
class Outcome:
    """What :func:`run_request` made: the pipeline's output, its record, and whether the inversion was reused."""

    result: Any
    record: dict
    shared_inversion: bool


#: Pipeline parameters whose request field has another name.
_REQUEST_FIELDS = {"num_inference_steps": "steps"}


@contextlib.contextmanager
def _named_as_request_fields():
    """Errors the pipeline raises about its parameters, renamed to the request's fields (checks that need the
    loaded model, such as the steps its scheduler was trained with, run there)."""
    try:
        yield
    except PFBDiffError as error:
        if error.parameter not in _REQUEST_FIELDS:
            raise
        raise PFBDiffError.about(_REQUEST_FIELDS[error.parameter], error.detail) from None


@_named_as_request_fields()
def run_request(request: EditRequest, pipe, inputs: Inputs | None = None, *, inversions: InversionCache | None = None,
                on_invert_step: Callable[[int], None] | None = None,
                on_edit_step: Callable[[int], None] | None = None) -> Outcome:
    """Run ``request`` on ``pipe`` (invert, or reuse a cached inversion, then edit) and record it.

    ``inputs`` are :func:`load_inputs` of the request when already loaded. ``on_invert_step(k)`` /
    ``on_edit_step(k)`` are called after each inversion / edit step.
    """
    import torch

    inputs = inputs or load_inputs(request)
    config = request.config_for(pipe.preset_family)
    pipe.check_words(request.prompt, config)  # a misspelt word, before the costly inversion
    plan = pipe.crop_plan(inputs.source.size, inputs.mask, crop=request.crop, crop_padding=request.crop_padding,
                          grow=config.mask_reach, feather=request.feather)
    digest = provenance.file_sha256(request.image)
    key = inversion_key(digest, request, plan)
    calls_before = pipe.unet_calls
    inversion = inversions.get(key) if inversions is not None else None
    shared = inversion is not None
    if not shared:
        options = pipe.inversion_options(config)
        if inversions is not None:  # a shared inversion records every block any preset blends
            options.pop("record_blocks", None)
        inversion = pipe.invert(inputs.source, request.source_prompt, request.steps, strength=config.strength,
                                plan=plan, callback=on_invert_step, **options)
        if inversions is not None:
            inversions.put(key, inversion)
    edited = [0]

    def on_step(pipeline, i, t, state):
        edited[0] += 1
        if on_edit_step is not None:
            on_edit_step(edited[0])
        return state

    result = pipe.edit(
        inversion, inputs.mask, request.prompt, preset=config, guidance_scale=request.guidance_scale,
        negative_prompt=request.negative_prompt or None, generator=torch.Generator().manual_seed(request.seed),
        callback_on_step_end=on_step, paste_back=request.paste_back, feather=request.feather,
        auto_mask=request.auto_mask, auto_mask_threshold=request.auto_mask_threshold,
    )
    record = provenance.make_record(request, config, pipe, result, inputs.source.size, image_sha256=digest,
                                    unet_calls=pipe.unet_calls - calls_before, shared_inversion=shared,
                                    **region_against_mask(inputs.mask, result))
    return Outcome(result, record, shared)


def region_against_mask(mask, result) -> dict:
    """Where the paste-back's edit region differs from the user's ``mask``: ``changed_outside_mask``, the pixels
    outside it the edit changed (the background preset's halo snap, ``grow``, a new object followed past the edge),
    and ``kept_inside_mask``, the pixels painted in it (above one half) the edit left as the photo's own (the
    attribute preset's inner halo); both ``None`` without a mask or a paste-back."""
    import numpy as np

    if mask is None or not result.masks:
        return {"changed_outside_mask": None, "kept_inside_mask": None}
    region, mask = np.asarray(result.masks[0]) > 0, np.asarray(mask)
    return {"changed_outside_mask": int(np.count_nonzero(region & (mask <= 0))),
            "kept_inside_mask": int(np.count_nonzero(~region & (mask > 0.5)))}


def region_notes(record: dict, setting=str) -> list[str]:
    """What a user is told when the edit region is not their mask (``region_against_mask``), naming the settings
    that made it so as ``setting(name)`` spells them (the CLI: its options); empty when it is."""
    notes = []
    if record.get("changed_outside_mask"):
        grow, halo, outgrow = map(setting, ("grow", "halo", "outgrow"))
        notes.append(f"the edit also changed {record['changed_outside_mask']} pixels outside your mask (grown, snapped "
                     f"to the subject, or following a new object drawn past its edge: {grow}, {halo} or {outgrow})")
    if record.get("kept_inside_mask"):
        notes.append(f"it left {record['kept_inside_mask']} pixels of your mask as they were (the old background "
                     f"around the subject: {setting('inner_halo')}=0 edits the whole mask)")
    return notes


def replay(record: dict | str | Path, *, pipe=None, allow_pickle: bool = False) -> Outcome:
    """Make the image of ``record`` (a dict, or a JSON / PNG path) again.

    The input files must still have the recorded digests. ``pipe`` defaults to the recorded model loaded on the
    recorded device and dtype. ``allow_pickle`` is never taken from a record (a record from someone else must not
    be able to run a pickle); pass it yourself.
    """
    if not isinstance(record, dict):
        record = provenance.load_record(record)
    request = EditRequest.from_record(record)
    provenance.check_inputs(record)
    if pipe is None:
        from pfbdiff.pipeline import load_pipeline

        pipe = load_pipeline(request.model, torch_dtype=request.dtype, device=request.device, loras=request.loras,
                             embeddings=request.embeddings, allow_pickle=allow_pickle, config=request.config, quiet=True)
    return run_request(request, pipe)
