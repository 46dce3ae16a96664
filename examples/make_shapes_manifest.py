"""Render the ShapesWorld scenes, masks and manifest of ``shapes-manifest.jsonl`` (run from anywhere).

    python examples/make_shapes_manifest.py        # rewrites examples/shapes-batch/*.png and the manifest
    pfbdiff batch examples/shapes-manifest.jsonl --out out/shapes-batch

Three source scenes, eight edits: lines that share a scene share one inversion.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pfbdiff.shapes.world import caption, make_scene, render

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "shapes-batch"
SIZE = 64
STEPS = 20

SCENES = {
    "scene-a": make_scene(("yellow", "plain"), [("red", "circle", 0.5, 0.5, 0.4)]),
    "scene-b": make_scene(("blue", "striped"), [("green", "square", 0.28, 0.5, 0.3), ("purple", "triangle", 0.72, 0.5, 0.3)]),
    "scene-c": make_scene(("green", "checkered"), [("orange", "triangle", 0.5, 0.55, 0.42)]),
}


def _mask_png(mask: np.ndarray, path: Path, grow: int = 2) -> str:
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    if grow:
        image = image.filter(ImageFilter.MaxFilter(2 * grow + 1))  # a little room around the object's edge
    image.save(path)
    return f"{FOLDER.name}/{path.name}"


def main() -> None:
    FOLDER.mkdir(exist_ok=True)
    images, objects, backgrounds = {}, {}, {}
    for name, scene in SCENES.items():
        result = render(scene, SIZE)
        Image.fromarray(result.image).save(FOLDER / f"{name}.png")
        images[name] = f"{FOLDER.name}/{name}.png"
        for index, mask in enumerate(result.object_masks):
            objects[name, index] = _mask_png(mask, FOLDER / f"{name}-object-{index + 1}.png")
        keep = np.any(result.object_masks, axis=0)
        backgrounds[name] = _mask_png(~keep, FOLDER / f"{name}-background.png", grow=0)

    def line(scene, mask, prompt, output, **extra):
        return {"image": images[scene], "mask": mask, "source_prompt": caption(SCENES[scene]), "prompt": prompt,
                "steps": STEPS, "seed": 0, "output": output, **extra}

    lines = [
        line("scene-a", objects["scene-a", 0], "a blue square on a plain yellow background", "a-blue-square.png"),
        line("scene-a", objects["scene-a", 0], "a green triangle on a plain yellow background", "a-green-triangle.png"),
        line("scene-a", backgrounds["scene-a"], "a red circle on a striped purple background", "a-striped-purple.png",
             preset="background"),
        line("scene-b", objects["scene-b", 0], "a red circle and a purple triangle on a striped blue background",
             "b-red-circle.png", inside=["red", "circle"]),
        line("scene-b", objects["scene-b", 1], "a green square and a yellow square on a striped blue background",
             "b-yellow-square.png", inside=["yellow"]),
        line("scene-c", backgrounds["scene-c"], "an orange triangle on a plain blue background", "c-plain-blue.png",
             preset="background"),
        line("scene-c", backgrounds["scene-c"], "an orange triangle on a checkered purple background",
             "c-checkered-purple.png", preset="background"),
        line("scene-c", objects["scene-c", 0], "a red circle on a checkered green background", "c-red-circle.png"),
    ]
    text = "".join(json.dumps(entry) + "\n" for entry in lines)
    (HERE / "shapes-manifest.jsonl").write_text(text)
    print(f"wrote {len(lines)} lines to {HERE / 'shapes-manifest.jsonl'} and {len(list(FOLDER.glob('*.png')))} PNGs")


if __name__ == "__main__":
    main()
