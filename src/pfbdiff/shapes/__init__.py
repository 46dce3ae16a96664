"""ShapesWorld: procedural scenes of coloured shapes, their captions, and exact oracles that read them back.

See :mod:`pfbdiff.shapes.world` (scenes, rendering, captions, held-out combinations) and
:mod:`pfbdiff.shapes.oracles` (deterministic image analysis for scoring generated and edited images, built on
:mod:`pfbdiff.shapes.colours` and :mod:`pfbdiff.shapes.binary_masks`).
"""

from pfbdiff.shapes.binary_masks import classify_shape, iou, label_components
from pfbdiff.shapes.colours import name_colour
from pfbdiff.shapes.oracles import (
    DetectedObject,
    SceneAnalysis,
    analyse,
    background_is,
    background_of,
    contains,
    find_objects,
    object_kept,
)
from pfbdiff.shapes.world import (
    COLOURS,
    HELD_OUT_BACKGROUNDS,
    HELD_OUT_OBJECTS,
    PALETTE,
    PATTERNS,
    SHADES,
    SHAPES,
    SPLITS,
    VOCABULARY,
    RenderResult,
    Scene,
    ShapeObject,
    background_phrase,
    caption,
    is_held_out_background,
    is_held_out_object,
    make_scene,
    object_phrase,
    parse_caption,
    render,
    sample_scene,
    uses_held_out,
    validate_scene,
)

__all__ = [
    "COLOURS", "HELD_OUT_BACKGROUNDS", "HELD_OUT_OBJECTS", "PALETTE", "PATTERNS", "SHADES", "SHAPES", "SPLITS",
    "VOCABULARY", "DetectedObject", "RenderResult", "Scene", "SceneAnalysis", "ShapeObject", "analyse",
    "background_is", "background_of", "background_phrase", "caption", "classify_shape", "contains",
    "find_objects", "iou", "is_held_out_background", "is_held_out_object", "label_components", "make_scene",
    "name_colour", "object_kept", "object_phrase", "parse_caption", "render", "sample_scene", "uses_held_out",
    "validate_scene",
]
