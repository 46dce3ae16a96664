"""ShapesWorld oracles (pfbdiff.shapes.oracles): agreement with ground truth, and the benchmark predicates."""

from collections import deque
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from pfbdiff.shapes import (
    ShapeObject,
    analyse,
    background_is,
    background_of,
    contains,
    find_objects,
    iou,
    label_components,
    make_scene,
    object_kept,
    render,
    sample_scene,
)

NOISE_SIGMA = 8.0  # in 0-255 units
MIN_AGREEMENT = 0.99


# --- Image perturbations -----------------------------------------------------------------------------------


def add_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.round(image + rng.normal(0.0, NOISE_SIGMA, image.shape)), 0, 255).astype(np.uint8)


def box_blur(image: np.ndarray) -> np.ndarray:
    """3x3 box blur with edge padding."""
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    total = sum(padded[y:y + h, x:x + w] for y in range(3) for x in range(3))
    return np.round(total / 9).astype(np.uint8)


def gaussian_blur(image: np.ndarray, sigma: float = 0.7) -> np.ndarray:
    """Separable Gaussian blur (5 taps) with edge padding."""
    taps = np.exp(-np.arange(-2, 3) ** 2 / (2 * sigma * sigma))
    taps /= taps.sum()
    out = image.astype(np.float64)
    h, w = image.shape[:2]
    padded = np.pad(out, ((2, 2), (0, 0), (0, 0)), mode="edge")
    out = sum(t * padded[i:i + h] for i, t in enumerate(taps))
    padded = np.pad(out, ((0, 0), (2, 2), (0, 0)), mode="edge")
    out = sum(t * padded[:, i:i + w] for i, t in enumerate(taps))
    return np.round(out).astype(np.uint8)


# --- Agreement with ground truth ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered():
    """300 scenes from every combination (held-out ones included), with their renders."""
    rng = np.random.default_rng(2024)
    scenes = [sample_scene(rng, split="any") for _ in range(300)]
    return scenes, [render(scene) for scene in scenes]


def agreement(scenes, results, perturb) -> dict[str, float]:
    """Share of scenes/objects where the oracles agree with ground truth, for images passed through perturb."""
    rng = np.random.default_rng(99)
    counts = dict(background=0, pattern=0, count=0, colour=0, shape=0, mask_iou=0.0)
    objects = 0
    for scene, result in zip(scenes, results):
        found = analyse(perturb(result.image, rng))
        counts["background"] += found.background == scene.background
        counts["pattern"] += found.pattern == scene.pattern
        counts["count"] += len(found.objects) == len(scene.objects)
        for obj, mask in zip(scene.objects, result.object_masks):
            objects += 1
            match = max(found.objects, key=lambda d: iou(d.mask, mask), default=None)
            overlap = iou(match.mask, mask) if match is not None else 0.0
            counts["colour"] += overlap >= 0.5 and match.colour == obj.colour
            counts["shape"] += overlap >= 0.5 and match.shape == obj.shape
            counts["mask_iou"] += overlap
    per_scene = ("background", "pattern", "count")
    return {k: v / (len(scenes) if k in per_scene else objects) for k, v in counts.items()}


PERTURBATIONS = {
    "clean": lambda image, rng: image,
    "noisy": add_noise,
    "box_blur": lambda image, rng: box_blur(image),
    "gaussian_blur_and_noise": lambda image, rng: add_noise(gaussian_blur(image), rng),
}


@pytest.mark.parametrize("condition", list(PERTURBATIONS))
def test_oracles_agree_with_ground_truth(rendered, condition):
    rates = agreement(*rendered, PERTURBATIONS[condition])
    for key in ("background", "pattern", "count", "colour", "shape"):
        assert rates[key] >= MIN_AGREEMENT, (condition, rates)
    # Detected masks reproduce the >= 50 % coverage ground truth (IoU ~0.99 on clean renders).
    assert rates["mask_iou"] >= (0.97 if condition == "clean" else 0.85), (condition, rates)


def test_oracles_work_at_128_pixels():
    rng = np.random.default_rng(11)
    scenes = [sample_scene(rng, split="any") for _ in range(30)]
    rates = agreement(scenes, [render(s, 128) for s in scenes], add_noise)
    assert min(rates[k] for k in ("background", "pattern", "count", "colour", "shape")) >= 0.95, rates


def test_image_formats_are_accepted():
    result = render(make_scene(("green", "striped"), [("red", "square", 0.5, 0.5, 0.3)]))
    as_float = result.image / 255.0
    as_pil = Image.fromarray(result.image)
    for image in (result.image, as_float, as_pil):
        objects = find_objects(image)
        assert [(o.colour, o.shape) for o in objects] == [("red", "square")]
        assert background_of(image) == ("green", "striped")


def test_unrecognisable_image_has_no_named_background():
    gray = np.full((64, 64, 3), 128, np.uint8)
    assert background_of(gray) == (None, "plain")
    assert find_objects(gray) == []


# --- Connected components and IoU --------------------------------------------------------------------------


def _reference_components(mask: np.ndarray) -> set[frozenset]:
    """4-connected components by breadth-first search, as sets of pixel coordinates."""
    seen = np.zeros_like(mask)
    components = set()
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        queue, pixels = deque([start]), []
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        components.add(frozenset(pixels))
    return components


@pytest.mark.parametrize("density", [0.3, 0.55, 0.7])
def test_label_components_matches_breadth_first_search(density):
    rng = np.random.default_rng(int(density * 100))
    for _ in range(5):
        mask = rng.random((40, 50)) < density
        labels, count = label_components(mask)
        ours = {frozenset(zip(*np.nonzero(labels == k))) for k in range(1, count + 1)}
        assert ours == _reference_components(mask)
        assert ((labels > 0) == mask).all()


def test_label_components_handles_long_snakes():
    mask = np.zeros((21, 21), bool)
    mask[::2, :] = True
    mask[1::4, -1] = True
    mask[3::4, 0] = True  # one serpentine path through the whole image
    labels, count = label_components(mask)
    assert count == 1 and (labels[mask] == 1).all()


def test_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert iou(a, b) == 0.0
    a[:2] = True
    b[1:3] = True
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, a) == 1.0


# --- Benchmark predicates ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edit_case():
    """A source scene and edited versions of it, as an editing benchmark would produce them."""
    source = make_scene(("blue", "striped"),
                        [("red", "circle", 0.3, 0.35, 0.34), ("yellow", "square", 0.72, 0.7, 0.3)])
    red_circle, yellow_square = source.objects
    return dict(
        source=source,
        rendered=render(source),
        replaced=render(replace(source, objects=(replace(red_circle, colour="green", shape="triangle"),
                                                 yellow_square))),
        recoloured=render(replace(source, objects=(replace(red_circle, colour="purple"), yellow_square))),
        moved=render(replace(source, objects=(replace(red_circle, cx=0.24), yellow_square))),
        removed=render(replace(source, objects=(yellow_square,))),
        empty=render(replace(source, objects=())),
        new_background=render(replace(source, background="orange", pattern="checkered")),
    )


def test_contains(edit_case):
    rendered = edit_case["rendered"]
    circle_region, square_region = rendered.object_masks
    image = rendered.image
    assert contains(image, "red", "circle", circle_region)
    assert contains(image, "red", None, circle_region)
    assert contains(image, "yellow", "square", square_region)
    assert not contains(image, "red", "square", circle_region)  # wrong shape
    assert not contains(image, "green", "circle", circle_region)  # wrong colour
    assert not contains(image, "red", "circle", square_region)  # elsewhere
    half = circle_region.copy()
    half[:, 15:] = False  # about a third of the circle (it spans columns 8-30)
    assert not contains(image, "red", "circle", half)
    assert contains(edit_case["replaced"].image, "green", "triangle", circle_region)
    assert not contains(edit_case["replaced"].image, "red", "circle", circle_region)
    assert not contains(edit_case["removed"].image, "red", None, circle_region)


def test_background_is(edit_case):
    image = edit_case["rendered"].image
    circle_region = edit_case["rendered"].object_masks[0]
    assert background_is(image, "blue", "striped")
    assert background_is(image, "blue")
    assert not background_is(image, "blue", "checkered")
    assert not background_is(image, "yellow", "striped")
    # Inside the object's region the source shows the object, not the background ...
    assert not background_is(image, "blue", region=circle_region)
    # ... and after a removal the background has been filled in.
    assert background_is(edit_case["removed"].image, "blue", "striped", region=circle_region)
    assert background_is(edit_case["empty"].image, "blue", "striped")
    assert find_objects(edit_case["empty"].image) == []
    assert background_is(edit_case["new_background"].image, "orange", "checkered")
    everything_but_objects = edit_case["rendered"].labels == 0
    assert background_is(edit_case["new_background"].image, "orange", "checkered", region=everything_but_objects)


def test_object_kept(edit_case):
    rendered, source = edit_case["rendered"], edit_case["source"]
    circle, square = source.objects
    circle_mask = rendered.object_masks[0]
    assert object_kept(circle_mask, circle, rendered.image)
    assert object_kept(rendered.labels, circle, rendered.image, object_index=0)
    assert object_kept(rendered.labels, ("yellow", "square"), rendered.image, object_index=1)
    assert object_kept(circle_mask, circle, add_noise(rendered.image, np.random.default_rng(0)))
    assert object_kept(circle_mask, circle, edit_case["new_background"].image)  # background edits keep objects
    assert object_kept(rendered.object_masks[1], square, edit_case["replaced"].image)
    assert not object_kept(circle_mask, circle, edit_case["replaced"].image)
    assert not object_kept(circle_mask, circle, edit_case["recoloured"].image)
    assert not object_kept(circle_mask, circle, edit_case["moved"].image)
    assert not object_kept(circle_mask, circle, edit_case["removed"].image)
    assert not object_kept(circle_mask, ShapeObject("red", "square", 0, 0, 0), rendered.image)
    with pytest.raises(ValueError):
        object_kept(rendered.labels, circle, rendered.image)  # two objects: which one?
