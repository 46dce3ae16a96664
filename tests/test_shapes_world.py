"""ShapesWorld scenes, rendering, captions and held-out combinations (pfbdiff.shapes.world)."""

import itertools
import math

import numpy as np
import pytest

from pfbdiff.errors import PFBDiffError
from pfbdiff.shapes import (
    COLOURS,
    HELD_OUT_BACKGROUNDS,
    HELD_OUT_OBJECTS,
    PALETTE,
    PATTERNS,
    SHADES,
    SHAPES,
    VOCABULARY,
    ShapeObject,
    background_phrase,
    caption,
    make_scene,
    object_phrase,
    parse_caption,
    render,
    sample_scene,
    uses_held_out,
    validate_scene,
)


@pytest.fixture(scope="module")
def train_scenes():
    rng = np.random.default_rng(1234)
    return [sample_scene(rng, split="train") for _ in range(2000)]


# --- Palette and vocabulary --------------------------------------------------------------------------------


def test_world_has_enough_distinct_colours_shapes_and_patterns():
    assert len(COLOURS) >= 5 and set(SHAPES) == {"circle", "square", "triangle"}
    assert set(PATTERNS) == {"plain", "striped", "checkered"}
    # Colours that can share a scene are far apart in RGB: any two palette colours, and a background's shade
    # versus every palette colour (its own colour included).
    closest_colours = min(math.dist(PALETTE[a], PALETTE[b]) for a, b in itertools.combinations(COLOURS, 2))
    closest_shade = min(math.dist(SHADES[a], PALETTE[b]) for a in COLOURS for b in COLOURS)
    assert closest_colours >= 60 and closest_shade >= 60


def test_vocabulary_is_sorted_unique_single_words():
    assert VOCABULARY == sorted(set(VOCABULARY))
    assert all(word.isalpha() and word.islower() for word in VOCABULARY)
    assert set(COLOURS) | set(SHAPES) | set(PATTERNS) | {"a", "and", "on", "background"} <= set(VOCABULARY)


# --- Captions ----------------------------------------------------------------------------------------------


def test_caption_examples_follow_the_grammar():
    one = make_scene(("blue", "striped"), [("red", "circle", 0.5, 0.5, 0.3)])
    assert caption(one) == "a red circle on a striped blue background"
    two = make_scene(("yellow", "plain"),
                     [("red", "circle", 0.25, 0.5, 0.3), ("green", "square", 0.75, 0.5, 0.3)])
    assert caption(two) == "a red circle and a green square on a plain yellow background"
    assert object_phrase(ShapeObject("orange", "square", 0.5, 0.5, 0.3)) == "an orange square"
    assert object_phrase(("purple", "triangle")) == "a purple triangle"
    assert background_phrase("green", "checkered") == "a checkered green background"


def test_captions_use_only_vocabulary_and_parse_back(train_scenes):
    rng = np.random.default_rng(7)
    scenes = train_scenes[:500] + [sample_scene(rng, split="any") for _ in range(300)]
    vocabulary = set(VOCABULARY)
    used = set()
    for scene in scenes:
        text = caption(scene)
        words = text.split()
        assert set(words) <= vocabulary, text
        used |= set(words)
        objects, background = parse_caption(text)
        assert objects == [(o.colour, o.shape) for o in scene.objects]
        assert background == (scene.background, scene.pattern)
    assert used == vocabulary  # every vocabulary word is actually reachable


@pytest.mark.parametrize("text", [
    "a red circle",
    "a red circle on a blue background",
    "a red circle on a striped blue floor",
    "a red blob on a plain blue background",
    "a orange circle on a plain blue background",
    "a red circle or a green square on a plain blue background",
    "a red circle and a green square and a blue circle on a plain yellow background",
])
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(PFBDiffError):
        parse_caption(text)


# --- Sampling and held-out combinations --------------------------------------------------------------------


def test_train_split_never_uses_held_out_combinations(train_scenes):
    for scene in train_scenes:
        assert not uses_held_out(scene)
        assert (scene.background, scene.pattern) not in HELD_OUT_BACKGROUNDS
        assert all((o.colour, o.shape) not in HELD_OUT_OBJECTS for o in scene.objects)


def test_train_split_covers_every_allowed_combination(train_scenes):
    objects = {(o.colour, o.shape) for s in train_scenes for o in s.objects}
    backgrounds = {(s.background, s.pattern) for s in train_scenes}
    assert objects == set(itertools.product(COLOURS, SHAPES)) - set(HELD_OUT_OBJECTS)
    assert backgrounds == set(itertools.product(COLOURS, PATTERNS)) - set(HELD_OUT_BACKGROUNDS)
    assert {len(s.objects) for s in train_scenes} == {1, 2}


def test_sampled_scenes_obey_the_world_rules(train_scenes):
    sizes = []
    for scene in train_scenes:
        validate_scene(scene)  # inside the image, gap between objects, colours differ from the background
        assert all(o.colour != scene.background for o in scene.objects)
        sizes += [o.size * 64 for o in scene.objects]
    assert 14 <= min(sizes) and max(sizes) <= 28


def test_any_and_heldout_splits():
    rng = np.random.default_rng(3)
    any_scenes = [sample_scene(rng, split="any") for _ in range(600)]
    objects = {(o.colour, o.shape) for s in any_scenes for o in s.objects}
    backgrounds = {(s.background, s.pattern) for s in any_scenes}
    assert set(HELD_OUT_OBJECTS) <= objects and set(HELD_OUT_BACKGROUNDS) <= backgrounds
    assert all(uses_held_out(sample_scene(rng, split="heldout")) for _ in range(100))


def test_sampling_is_deterministic_per_seed():
    first = [sample_scene(np.random.default_rng(42)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    assert np.array_equal(render(first[0]).image, render(first[1]).image)


def test_forced_attributes():
    rng = np.random.default_rng(5)
    for _ in range(50):
        scene = sample_scene(rng, background="blue", pattern="plain", objects=[("red", "circle"), (None, "square")])
        assert (scene.background, scene.pattern) == ("blue", "plain")
        assert (scene.objects[0].colour, scene.objects[0].shape) == ("red", "circle")
        assert scene.objects[1].shape == "square" and scene.objects[1].colour != "blue"
        assert len(sample_scene(rng, n_objects=1, background="green").objects) == 1
    held = sample_scene(rng, split="any", background="blue", pattern="checkered", objects=[("green", "triangle")])
    assert uses_held_out(held)


@pytest.mark.parametrize("kwargs", [
    dict(background="blue", pattern="checkered"),  # held-out background in the train split
    dict(objects=[("purple", "circle")]),  # held-out object in the train split
    dict(background="red", objects=[("red", None)]),  # object colour equals the background
    dict(objects=[("pink", None)]),
    dict(n_objects=3),
    dict(split="test"),
])
def test_impossible_forcing_raises(kwargs):
    with pytest.raises(PFBDiffError):
        sample_scene(np.random.default_rng(0), **kwargs)


@pytest.mark.parametrize("background, objects", [
    (("red", "plain"), [("red", "circle", 0.5, 0.5, 0.3)]),  # invisible object
    (("red", "plain"), [("blue", "circle", 0.1, 0.5, 0.3)]),  # sticks out of the image
    (("red", "plain"), [("blue", "circle", 0.4, 0.5, 0.3), ("green", "square", 0.6, 0.5, 0.3)]),  # overlap
    (("red", "wavy"), [("blue", "circle", 0.5, 0.5, 0.3)]),
    (("red", "plain"), [("blue", "star", 0.5, 0.5, 0.3)]),
    (("red", "plain"), [("blue", "circle", 0.2, 0.2, 0.3), ("green", "square", 0.7, 0.2, 0.3),
                        ("yellow", "circle", 0.5, 0.7, 0.3)]),  # too many objects
])
def test_make_scene_rejects_invalid_scenes(background, objects):
    with pytest.raises(PFBDiffError):
        make_scene(background, objects)


# --- Rendering ---------------------------------------------------------------------------------------------


def test_render_outputs_and_ground_truth_are_consistent(train_scenes):
    for scene in train_scenes[:200]:
        result = render(scene)
        assert result.image.shape == (64, 64, 3) and result.image.dtype == np.uint8
        assert result.labels.shape == (64, 64) and len(result.object_masks) == len(scene.objects)
        for index, (obj, mask) in enumerate(zip(scene.objects, result.object_masks)):
            assert mask.dtype == bool and mask.any()
            assert np.array_equal(result.labels == index + 1, mask)
            # Interior pixels (away from anti-aliased edges) have the exact palette colour.
            inner = mask & ~_grow(~mask)
            assert (result.image[inner] == PALETTE[obj.colour]).all()
        far_from_objects = ~_grow(result.labels > 0)
        # Stripe and check cells are exactly 8 px at 64x64, so background pixels are exact too.
        background_pixels = result.image[far_from_objects]
        is_colour = (background_pixels == PALETTE[scene.background]).all(axis=1)
        is_shade = (background_pixels == SHADES[scene.background]).all(axis=1)
        assert (is_colour | is_shade).all() and is_colour.any()
        assert is_shade.any() == (scene.pattern != "plain")


def test_object_masks_have_the_ideal_areas():
    expected_fill = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
    for shape, size in itertools.product(SHAPES, (0.22, 0.3, 0.43)):
        scene = make_scene(("blue", "striped"), [("red", shape, 0.5, 0.5, size)])
        for pixels in (64, 128):
            area = render(scene, pixels).object_masks[0].sum()
            ideal = expected_fill[shape] * (size * pixels) ** 2
            # The >= 50 % coverage rule can add or drop about one pixel along each side.
            assert abs(area - ideal) <= 2 * size * pixels, (shape, size, pixels, area, ideal)


def test_scene_without_objects_renders_but_has_no_caption():
    empty = make_scene(("purple", "checkered"), [])
    result = render(empty)
    assert result.object_masks == [] and (result.labels == 0).all()
    with pytest.raises(PFBDiffError):
        caption(empty)


def test_render_scales_to_other_sizes():
    scene = make_scene(("green", "checkered"),
                       [("purple", "triangle", 0.3, 0.3, 0.3), ("yellow", "circle", 0.7, 0.7, 0.35)])
    small, large = render(scene, 64), render(scene, 128)
    assert large.image.shape == (128, 128, 3)
    downsized = large.labels.reshape(64, 2, 64, 2)[:, 0, :, 0]
    assert (downsized == small.labels).mean() > 0.98


def _grow(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation, for excluding anti-aliased edge pixels."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([padded[y:y + h, x:x + w] for y in range(3) for x in range(3)])

