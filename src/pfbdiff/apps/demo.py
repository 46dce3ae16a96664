"""The offline demo: one rendered ShapesWorld picture, edited twice by PFB-Diff with the bundled model.

``pfbdiff demo`` renders a red circle on a plain yellow background, inverts it once, then runs an
*object replacement* (a box mask around the circle; "a blue square" confined to it) and a *background
replacement* (everything but the circle; the circle's words confined outside the mask) from that one
inversion. It writes the source, both masks, both results and a labelled side-by-side picture, and reads
each result with the ShapesWorld oracles, so the demo says whether the edit worked, not only that it ran.

The two edits are ShapesBench cases built by hand (:class:`~pfbdiff.bench.cases.Case`), so the masks, the
confined words and the success test are exactly the benchmark's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pfbdiff.bench.cases import Case, CaseImages, render_case
from pfbdiff.bench.metrics import edit_success
from pfbdiff.bench.shapes import DEFAULT_GUIDANCE, TASK_PRESET, edit_arguments, model_image_size
from pfbdiff.errors import PFBDiffError
from pfbdiff.io.outputs import read_png_metadata, save_png
from pfbdiff.shapes.world import caption, is_held_out_background, is_held_out_object, make_scene

SOURCE = make_scene(("yellow", "plain"), [("red", "circle", 0.5, 0.5, 0.42)])
OBJECT_TARGET = make_scene(("yellow", "plain"), [("blue", "square", 0.5, 0.5, 0.42)])
BACKGROUND_TARGET = make_scene(("green", "striped"), [("red", "circle", 0.5, 0.5, 0.42)])
SOURCE_CAPTION = caption(SOURCE)
VIEW_SCALE = 4  # the side-by-side picture is enlarged (nearest neighbour) so 64 px edits can be seen
FILES = ("source.png", "object-mask.png", "object-edit.png", "background-mask.png", "background-edit.png", "demo.png")


def demo_cases() -> tuple[Case, Case]:
    """The demo's object replacement and background replacement, as ShapesBench cases."""
    obj = OBJECT_TARGET.objects[0]
    return (
        Case("object", 0, 0, SOURCE, OBJECT_TARGET, (0,), "box", is_held_out_object(obj.colour, obj.shape)),
        Case("background", 0, 0, SOURCE, BACKGROUND_TARGET, (), "background",
             is_held_out_background(BACKGROUND_TARGET.background, BACKGROUND_TARGET.pattern)),
    )


@dataclass
class DemoEdit:
    """One edit of the demo: the case rendered at the model's size, the result and the oracles' reading."""

    images: CaseImages
    result: np.ndarray
    verdict: dict[str, bool]

    @property
    def summary(self) -> str:
        case = self.images.case
        if case.task == "object":
            what = f"a {case.new_phrases[0]} in the box"
        else:
            what = f"a {case.target.pattern} {case.target.background} background, {case.kept_phrases[0]} kept"
        failed = [k for k in ("target_present", "old_gone", "others_kept", "background_ok") if not self.verdict[k]]
        status = "the oracles find it" if self.verdict["success"] else f"the oracles say no ({', '.join(failed)})"
        return f"{case.task} replacement, {what}: {status}"


def check_demo_folder(out: Path) -> None:
    """Refuse to write into ``out`` where that would replace a file the demo did not write itself."""
    if out.exists() and not out.is_dir():
        raise PFBDiffError(f"--out {out} is a file, not a folder; choose another --out")
    for name in FILES:
        path = out / name
        if path.exists() and not _written_by_demo(path):
            raise PFBDiffError(f"{path} exists and was not written by `pfbdiff demo`; choose another --out")


def _written_by_demo(path: Path) -> bool:
    try:
        return read_png_metadata(path).get("demo") is True
    except Exception:  # noqa: BLE001 - unreadable means not ours
        return False


def run_demo(pipe, *, steps: int = 50, seed: int = 0) -> list[DemoEdit]:
    """Invert the demo picture once and run both edits from that inversion."""
    size = model_image_size(pipe)
    rendered = [render_case(case, size) for case in demo_cases()]
    inversion = pipe.invert(Image.fromarray(rendered[0].source), SOURCE_CAPTION, steps)
    edits = []
    for images in rendered:
        case = images.case
        out = pipe.edit(inversion, prompt=case.target_caption, preset=TASK_PRESET[case.task],
                        guidance_scale=DEFAULT_GUIDANCE, generator=torch.Generator().manual_seed(seed),
                        **edit_arguments(images))
        result = np.asarray(out.images[0].convert("RGB"))
        edits.append(DemoEdit(images, result, edit_success(images, result)))
    return edits


def write_demo(edits: list[DemoEdit], out: Path, metadata: dict) -> list[Path]:
    """Write the demo's PNGs into ``out`` (created if missing); return the paths written."""
    check_demo_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    object_edit, background_edit = edits
    pictures = [  # (file, pixels, the edit it belongs to)
        ("source.png", object_edit.images.source, None),
        ("object-mask.png", _mask_picture(object_edit.images.mask), object_edit),
        ("object-edit.png", object_edit.result, object_edit),
        ("background-mask.png", _mask_picture(background_edit.images.mask), background_edit),
        ("background-edit.png", background_edit.result, background_edit),
        ("demo.png", side_by_side(edits), None),
    ]
    written = []
    for name, array, edit in pictures:
        record = {**metadata, "demo": True, "file": name}
        if edit is not None:
            record.update(prompt=edit.images.case.target_caption, oracle=edit.verdict)
        written.append(save_png(Image.fromarray(array), out / name, record))
    return written


def _mask_picture(mask: np.ndarray) -> np.ndarray:
    return np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=-1)


def side_by_side(edits: list[DemoEdit]) -> np.ndarray:
    """source | object mask | object edit | background mask | background edit, enlarged and labelled."""
    object_edit, background_edit = edits
    new_background = background_edit.images.case.target
    panels = [("source", object_edit.images.source),
              ("mask", _mask_picture(object_edit.images.mask)),
              (f"a {object_edit.images.case.new_phrases[0]}", object_edit.result),
              ("mask", _mask_picture(background_edit.images.mask)),
              (f"{new_background.pattern} {new_background.background} bg", background_edit.result)]
    size = object_edit.images.size * VIEW_SCALE
    label_height, gap = 16, 4
    canvas = Image.new("RGB", (len(panels) * (size + gap) - gap, size + label_height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, array) in enumerate(panels):
        x = i * (size + gap)
        canvas.paste(Image.fromarray(array).resize((size, size), Image.NEAREST), (x, label_height))
        draw.text((x + 2, 2), label, fill="black")
    return np.asarray(canvas)

