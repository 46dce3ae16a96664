"""Writing results: PNGs that carry the edit's settings, written atomically, never over the inputs.

* :func:`save_png` writes the result atomically (temporary file + ``os.replace``) with the settings in a
  ``pfbdiff`` text chunk (JSON) and an A1111-style ``parameters`` chunk; :func:`read_png_metadata` reads
  them back.
* :func:`check_output_path` is every check on an output path, so callers can refuse a bad ``-o`` before
  doing any work.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Union

from PIL import Image, PngImagePlugin

from pfbdiff.errors import PFBDiffError
from pfbdiff.io.images import check_readable_file, one_line
from pfbdiff.io.pixel_formats import pil_to_rgb

#: PNG text chunk holding the JSON-encoded edit settings.
METADATA_KEY = "pfbdiff"
#: PNG text chunk with a human-readable summary, where AUTOMATIC1111-style tools look for settings.
PARAMETERS_KEY = "parameters"

# A1111's names for the settings it shows in its "parameters" chunk.
_A1111_NAMES = {
    "steps": "Steps",
    "num_inference_steps": "Steps",
    "guidance_scale": "CFG scale",
    "seed": "Seed",
    "scheduler": "Sampler",
    "model": "Model",
    "size": "Size",
}

ProtectedPaths = Union[Iterable[Union[str, os.PathLike, None]], Mapping[str, Union[str, os.PathLike, None]]]


def save_png(image: Image.Image, path: str | os.PathLike, metadata: Mapping[str, Any], *,
             protect: ProtectedPaths = ()) -> Path:
    """Write ``image`` as a PNG at ``path`` with ``metadata`` embedded, atomically; return the path written.

    The settings go into a ``pfbdiff`` text chunk (JSON) and a human-readable ``parameters`` chunk. The file
    appears complete or not at all (temporary file + ``os.replace``). ``protect`` lists paths that must never
    be overwritten (the input image and mask); a mapping ``{"input image": path}`` names them in the error.
    """
    target = Path(path).expanduser()
    check_output_path(target, protect)
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(dict(metadata), ensure_ascii=False, default=str))
    info.add_text(PARAMETERS_KEY, format_parameters(metadata))
    image = _png_compatible(image)
    _write_atomically(target, lambda stream: image.save(stream, format="PNG", pnginfo=info))
    return target


def region_path(output: str | os.PathLike) -> Path:
    """Where the region an edit changed is saved beside ``output`` when it reaches past the user's mask."""
    target = Path(output).expanduser()
    return target.with_name(f"{target.stem}.region.png")


def check_output_path(target: Path, protect: ProtectedPaths) -> None:
    if target.is_dir():
        raise PFBDiffError(f"output path is a directory: {target}; give a file name such as {target / 'edited.png'}")
    if target.suffix.lower() != ".png":
        raise PFBDiffError(f"output file must end in .png, got {target}; PNG is lossless and keeps the edit settings")
    folder = target.parent
    if not folder.exists():
        raise PFBDiffError(f"output folder does not exist: {folder}; create it first or choose another -o path")
    if not folder.is_dir():
        raise PFBDiffError(f"output folder {folder} is a file, not a folder; choose another -o path")
    for label, protected in _labelled_paths(protect):
        if _same_file(target, Path(protected).expanduser()):
            raise PFBDiffError(f"refusing to overwrite the {label} {protected}; choose another -o path")


def _labelled_paths(protect: ProtectedPaths) -> list[tuple[str, str | os.PathLike]]:
    if isinstance(protect, Mapping):
        pairs = list(protect.items())
    else:
        pairs = [("input file", protected) for protected in protect]
    return [(label, protected) for label, protected in pairs if protected is not None]


def _same_file(first: Path, second: Path) -> bool:
    # resolve() catches relative paths and symlinks; samefile() also catches hard links and case-insensitive disks.
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _png_compatible(image: Image.Image) -> Image.Image:
    if image.mode in ("RGB", "RGBA", "L", "LA", "1", "P", "I;16"):
        return image
    return pil_to_rgb(image, "output image")


#: The hidden temporary name an atomic write uses beside its target: ``.NAME.<8 hex digits>.tmp``.
TEMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp")


def remove_stale_temporaries(targets: Iterable[Path]) -> int:
    """Delete the temporaries (:data:`TEMP_NAME`) that a killed run left beside these targets, and only theirs;
    return how many."""
    wanted: dict[Path, set[str]] = {}
    for target in targets:
        wanted.setdefault(Path(target).parent, set()).add(Path(target).name)
    removed = 0
    for folder, names in wanted.items():
        if not folder.is_dir():
            continue
        for candidate in folder.iterdir():
            match = TEMP_NAME.fullmatch(candidate.name)
            if match and match.group(1) in names and candidate.is_file():
                candidate.unlink(missing_ok=True)
                removed += 1
    return removed


def _write_atomically(target: Path, write: Callable[[Any], None]) -> None:
    """``write(stream)`` into a hidden temporary file beside ``target``, then rename it over ``target`` in one
    step, so a reader never sees a partial file and a killed run leaves only a temporary (:data:`TEMP_NAME`),
    which the next write of the same target removes."""
    remove_stale_temporaries([target])
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    created = False
    try:
        # os.open with 0o666 lets the umask decide the permissions, as for any normally created file.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with os.fdopen(descriptor, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except PermissionError:
        raise PFBDiffError(f"cannot write {target}: permission denied; choose another output path") from None
    except OSError as error:
        reason = one_line(error.strerror or str(error))
        raise PFBDiffError(f"cannot write {target} ({reason}); choose another output path") from None
    finally:
        if created:
            temporary.unlink(missing_ok=True)  # already gone after a successful os.replace


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    _write_atomically(Path(path), lambda stream: stream.write(text.encode("utf-8")))


def format_parameters(metadata: Mapping[str, Any]) -> str:
    """A1111-style summary: the prompt, a "Negative prompt:" line, then "Name: value" pairs."""
    settings = dict(metadata)
    lines = []
    if "prompt" in settings:
        lines.append(_summary_value(settings.pop("prompt")))
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {_summary_value(settings.pop('negative_prompt'))}")
    settings.pop("negative_prompt", None)
    pairs = [f"{_A1111_NAMES.get(key, _humanise(key))}: {_summary_value(value)}" for key, value in settings.items()]
    if pairs:
        lines.append(", ".join(pairs))
    return "\n".join(lines)


def _humanise(key: str) -> str:
    words = str(key).replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def _summary_value(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(side, int) for side in value):
        return f"{value[0]}x{value[1]}"  # A1111 writes sizes as 512x768
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return one_line(text)


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return the settings :func:`save_png` embedded in ``path``; ``{}`` for a PNG without them."""
    source = Path(path).expanduser()
    check_readable_file(source, "PNG")
    try:
        with Image.open(source) as image:
            text = getattr(image, "text", {}).get(METADATA_KEY)
    except Exception as error:  # noqa: BLE001 - same zoo of decoder errors as in _open_image_file
        reason = one_line(str(error)) or type(error).__name__
        raise PFBDiffError(f"cannot read {source} as a PNG ({reason}); pass a PNG written by pfbdiff") from None
    if text is None:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise PFBDiffError(f"the {METADATA_KEY} metadata in {source} is not valid JSON; the file was altered") from None
