"""Edit settings and the task presets, as data (docs/method.md §8).

An :class:`EditConfig` holds every knob of a PFB-Diff edit. Presets are named configs for the paper's tasks;
any field can be overridden (``get_preset("object", t_combine=100)``). The ``paper-*`` presets reproduce the
official code, quirks included (docs/method.md §9): blend points and attention blocks as explicit block numbers, the
middle-block source off-by-one, the latent blend with the one-step-noisier source latent, unclamped bicubic
feature masks, a Lanczos-thresholded latent mask, masking of the unconditional pass, fixed token positions,
and the sequential three-pass step. Our own presets fix the quirks and describe blend points by resolution
level (``-1`` = the deepest level, ``-2`` the one above), so they carry over to other U-Nets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pfbdiff.errors import PFBDiffError

#: How the user mask is resized to each feature map (docs/method.md §7): area averaging or the reference's bicubic.
RESIZE_MODES = ("area", "bicubic")
#: The latent-blend mask: the area-resized user mask, or the reference's thresholded Lanczos resize.
LATENT_MASK_MODES = ("soft", "binary")


@dataclass(frozen=True)
class EditConfig:
    """Every setting of a PFB-Diff edit. Names follow docs/method.md; the task presets (``PRESETS``) change some."""

    # -- progressive feature blending (docs/method.md §4)
    blend_levels: tuple[int, ...] = (-2, -1)  # resolution levels whose blocks are blended (output level)
    blend_blocks: tuple[int, ...] | None = None  # explicit block numbers L; overrides blend_levels
    blend_skips: bool = False  # also send blended features down the skip connections (reference: no)
    reference_middle: bool = False  # quirk 1: block before the middle mixes with the source middle *output*
    mask_resize: str = "area"  # "area" (clamped, soft) or "bicubic" (reference: unclamped)
    # -- attention masking (docs/method.md §5)
    attention_masking: bool = True
    # levels at which cross-attention is masked: every level. The official code skips the full-resolution one;
    # on ShapesBench's held-out cases masking it too raised multi-object successes from 19 to 33 % and background
    # ones from 29 to 53 % (README).
    attention_levels: tuple[int, ...] = (0, 1, 2, 3)
    attention_blocks: tuple[int, ...] | None = None  # explicit block numbers L; overrides attention_levels
    mask_uncond: bool = False  # quirk 4: also mask the unconditional pass
    inside: tuple = ()  # words (or raw token positions) allowed only inside the edit mask
    outside: tuple = ()  # words allowed only outside it
    auto_words: str | None = "new-inside"  # with no words given: "new-inside", "subject-outside" or None
    # multi-object edits: inside each word mask's region the cross-attention reads a prompt of the region's own
    # (``region_prompts[word]``, else the word itself) instead of the edit's prompt (regional prompting)
    own_region_prompts: bool = False
    # background edits: this share of the new background's cross-attention output (conditional rows) is read from
    # the prompt without the kept subject's words, the rest from the whole prompt, so the subject the text encoder
    # carries into every later token is not drawn again around itself (docs/method.md §5); U-Nets only. On
    # ShapesBench's tuning cases 173 of 200 background edits against 160 at 0.25, 79 of 100 at 0.5 (README)
    background_prompt_share: float = 0.0
    # a confined word's attention inside its own region gets this many extra logits in the early steps
    # (while t > word_boost_until), so each word is drawn where its region is (docs/method.md §5). The official
    # code has no boost; on ShapesBench's tuning cases it raised multi-object successes from 25 to 42 of 80 and
    # object ones from 53 to 60 (README)
    word_boost: float = 8.0
    word_boost_until: int = 700
    # the boost acts on the attention cells a word's region covers by more than this share (0.5: wherever the word
    # is allowed; 0.99: only the cells wholly inside the region, so the word is not pulled onto the mask's edge). The
    # attribute preset's (README): with the boost until t = 500, 179 tuning attribute edits of 200 against 169, at a
    # seam error 1.3 higher where boosting every allowed cell costs 3; on object edits it lost (68 of 100 against 74)
    word_boost_cover: float = 0.5
    # once the layout is settled (t <= word_boost_until) the words confined inside a mask, and each word of a
    # multi-object edit, act only on its core: the mask less a band along its edge this share of its size (the square
    # root of its area) wide, so the new object's edges are drawn inside the coarse mask and the band as the
    # surroundings (photo/morphology.mask_core, docs/method.md §5); 0: the whole mask
    word_inset: float = 0.0
    # once the layout is settled, the latent blend (while it runs) also keeps the band along the mask's edge this share
    # of its size wide as the photo's, so the new object is laid out inside the mask and its rim settles off the mask's
    # edge, where the photo's surroundings continue (docs/method.md §6); 0: the whole mask is regenerated
    latent_inset: float = 0.0
    # background edits: in the conditional rows the edit region's self-attention does not read the kept region, so
    # the new background is not drawn from the subject's features (a larger, blurred copy of a small subject around
    # it); on ShapesBench's tuning cases 59 of 80 background edits against 50 (README)
    kept_apart: bool = False
    # background edits: the words confined outside the mask (the kept subject's) are added to the negative prompt,
    # so guidance steers the new region away from redrawing the subject around itself; on ShapesBench's tuning
    # cases 161 of 200 background edits against 151 (README)
    kept_words_negative: bool = False
    # -- gates (docs/method.md §1)
    t_combine: int = 0  # feature blending and attention masking run while t > t_combine
    latent_blend: float = 0.5  # s: the latent blend runs while n / N > s
    reference_latent_index: bool = False  # quirk 2: blend with Z[n] (one level noisier) instead of Z[n-1]
    # "inverted" (the paper: the DDIM-inverted source latent) or "noised" (Blended Latent Diffusion's: the clean
    # source latent forward-noised with fresh seeded noise to the level each step lands on)
    latent_reference: str = "inverted"
    latent_mask: str = "soft"  # "soft" (area-resized) or "binary" (reference: Lanczos, threshold 0.5)
    # -- start and schedule (docs/method.md §2)
    # "inverted" (the DDIM-inverted source latent), "noise" (seeded Gaussian) or "noise-in-mask" (the noise inside
    # the edit mask, the inverted latent outside it: the new object's layout is not the old one's)
    start: str = "inverted"
    strength: float = 1.0  # ratio K / N of the steps that are inverted and re-generated, in (0, 1]
    grow: int = 0  # grow (+) or shrink (−) the edit mask by this many pixels of the input image
    halo: int = 0  # grow the mask up to this many pixels into kept pixels that continue its colours (halo.py)
    # attribute edits: the paste-back leaves out the old background inside the mask around the subject (the inner
    # halo: masked pixels continuing the photo's colours around the mask, up to this share of the mask's size in
    # from its edge, photo/halo.py), so those pixels stay the photo's own and the new colour keeps the subject's
    # outline; the method's own masks are the user's. 0: off
    inner_halo: float = 0.0
    # the paste-back takes new content whole: not faded in the feather band, and followed past the mask's edge up to
    # this share of the mask's size (photo/new_content.py); 0: the mask's edge cuts what the model drew across it
    outgrow: float = 0.0
    # background edits: the kept subject's ghost, a larger copy of it the model draws around it, is cleared up to this
    # share of the edited box's shorter side from the subject and filled with the new background's pattern
    # (photo/ghost.py); it needs the subject's outline, so it acts with a halo only; 0: off
    ghost_reach: float = 0.0
    # -- SDXL's added conditioning (docs/method.md §12)
    # the pooled text vector modulates every block, blended or not: "target" (the edit's prompt) or "source"
    pooled_from: str = "target"
    # the size ids of a crop-to-mask edit: "model" (the crop seen whole at the model size) or "box" (the model size
    # made from a box of the photo's pixel size); fixed by the inversion, which every edit of it shares
    size_ids: str = "model"
    # -- flow-matching transformers, SD3 and Flux (docs/method.md §13-16)
    # the blend window: the first fraction of the blocks are blended, the rest left free to harmonise the seam
    blend_depth: float = 0.5
    text_queries: bool = False  # also let a confined word's own text queries see only its region (§15)
    flow_solver: str = "euler"  # the inversion's ODE solver: "euler", "midpoint" or "fireflow" (§13)
    # -- compute
    cache_source: bool = True  # take source features from the inversion instead of re-running the source
    batch_cfg: bool = True  # unconditional and conditional rows in one U-Net call

    @property
    def mask_reach(self) -> int:
        """Pixels beyond the user's mask that the edit mask may reach (``grow`` + ``halo``): the inverted
        crop must cover them."""
        return self.grow + self.halo

    def replace(self, **changes) -> "EditConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise PFBDiffError(f"unknown edit setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> "EditConfig":
        if self.halo < 0:
            raise PFBDiffError.about("halo", f"must be a number of pixels >= 0, got {self.halo}, e.g. 8")
        shares = {"outgrow": ("a share of the mask's size", 0.25), "ghost_reach": ("a share of the edited box's side", 0.25),
                  "blend_depth": ("a fraction of the blocks", 0.5), "background_prompt_share": ("a share", 0.25),
                  "word_inset": ("a share of the mask's size", 0.08), "inner_halo": ("a share of the mask's size", 0.25),
                  "latent_inset": ("a share of the mask's size", 0.12)}
        for name, (what, example) in shares.items():
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PFBDiffError.about(name, f"must be {what} in [0, 1], got {getattr(self, name)}, e.g. {example}")
        if not 0.0 <= self.word_boost_cover < 1.0:
            raise PFBDiffError.about("word_boost_cover", f"must be a share of an attention cell in [0, 1), got "
                                     f"{self.word_boost_cover}, e.g. 0.99")
        if not 0.0 < self.strength <= 1.0:
            raise PFBDiffError.about("strength", f"must be in (0, 1], got {self.strength}, e.g. 0.8")
        choices = {"start": ("inverted", "noise", "noise-in-mask"), "latent_reference": ("inverted", "noised"),
                   "mask_resize": RESIZE_MODES, "latent_mask": LATENT_MASK_MODES,
                   "auto_words": (None, "new-inside", "subject-outside"), "pooled_from": ("target", "source"),
                   "size_ids": ("model", "box"), "flow_solver": ("euler", "midpoint", "fireflow")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                listed = " or ".join(repr(choice) for choice in allowed).replace("None", "none")
                raise PFBDiffError.about(name, f"must be {listed}, got {getattr(self, name)!r}")
        return self


# COCO-script block numbers of the official code (docs/method.md §9), written as L.
_PAPER_OBJECT_BLOCKS = (8, 9, 10, 11, 12, 14, 15, 16, 17, 18)
_PAPER_BACKGROUND_BLOCKS = (7,) + _PAPER_OBJECT_BLOCKS
_PAPER_OBJECT_ATTENTION = (8, 9, 13, 17, 18, 19, 20, 21)
_PAPER_BACKGROUND_ATTENTION = (5, 6, 8, 9, 13, 17, 18, 19, 20, 21, 22)
_PAPER_QUIRKS = dict(
    reference_middle=True,
    mask_resize="bicubic",
    mask_uncond=True,
    reference_latent_index=True,
    latent_mask="binary",
    auto_words=None,
    word_boost=0.0,
    cache_source=False,
    batch_cfg=False,
)

#: How far object edits follow a new object past the mask (a share of its size, ``photo/new_content.py``). On
#: ShapesBench's tuning cases the paste-back no longer cuts new objects that outgrow their masks: 96 → 131 of 200
#: multi-object edits, 152 → 162 of 200 object edits. Attribute edits keep the object's outline and gain nothing
#: (87 → 86 of 100), so they leave it off (README, "New objects are not cut").
OUTGROW = 0.25

#: How wide a band along the mask's edge object and two-object edits keep their words out of once the layout is
#: settled (a share of the mask's size, ``word_inset``). On ShapesBench's tuning cases 200-399 the new object is drawn
#: nearer the ideal edit's size (mean area 1.13 -> 1.03 of it) and past the mask's edge half as often, and the seam
#: gradient error falls 13.8 -> 11.9 (object, 159 edits of 200 against 162) and 13.9 -> 11.6 (two objects at 0.12,
#: 126 against 131), both within the noise; 0.12 on single objects lost 11 and 0.08 on two objects 9. Attribute edits
#: leave it off: the inner halo keeps the old outline in the paste-back (``INNER_HALO``), and a core on top of it
#: changes nothing (188 against 189 of 200, README).
#: With the latent core below (``LATENT_INSET``) single objects need less of it: on cases 200-399, 161 object edits of
#: 200 at 0.04 against 157 at 0.08 and 161 at 0, seam gradient error 10.5, 10.0 and 11.0; two objects keep 0.12 (120
#: against 119 at 0.08 and 123 at 0, seam gradient error 10.3, 10.7 and 11.7). The flow models keep 0.08
#: (``FAMILY_PRESETS``), where the narrower core was not measured.
WORD_INSET = {"object": 0.04, "multi-object": 0.12}

#: How wide a band along the mask's edge object and two-object edits keep as the photo's in the latent blend once the
#: layout is settled (a share of the mask's size, ``latent_inset``): the new object is laid out off the mask's edge and
#: its rim no longer sits on it. On ShapesBench's tuning cases 200-399 the seam gradient error falls 11.9 -> 10.5 (object,
#: with the words' core at 0.04: 161 edits of 200 against 159) and 11.6 -> 10.3 (two objects at 0.08, 120 against 126;
#: at 0.12 on cases 200-279 44 against 51 of 80 at 10.1), README.
LATENT_INSET = {"object": 0.12, "multi-object": 0.08}

#: Where object and two-object edits start (``start``, docs/method.md §2): seeded noise inside the edit mask, the
#: inverted latent outside it. The inverted latent is made to give the photo back, so inside the mask it still lays out
#: the old object, and the new one was drawn in the old one's place and shape (a triangle over a circle came out a
#: rounded blob). On ShapesBench's tuning cases 200-599, 335 object edits of 400 against 321 (seam gradient error
#: 10.2 -> 9.9; on fresh cases 600-799 156 against 151 of 200, 9.6 -> 9.9), and on cases 200-399 125 two-object edits
#: of 200 against 120 (10.3 -> 10.2). Background edits gain nothing (75 against 77 of 80), attribute edits keep the
#: subject's layout on purpose, and the flow models keep the inverted start (``FAMILY_PRESETS``), README.
NEW_LAYOUT_START = "noise-in-mask"

#: How far in from the mask's edge attribute edits leave the old background around the subject to the photo (a share
#: of the mask's size, ``inner_halo``). On ShapesBench's tuning cases 200-399, 188 attribute edits of 200 against 179
#: (9 won, none lost) and the seam gradient error 10.5 -> 2.0; 8 px and 0.5 score the same, 0.15 loses 3 of 80 (README).
INNER_HALO = 0.25

#: How far background edits clear the kept subject's ghost (a share of the edited box's side, ``photo/ghost.py``). On
#: ShapesBench's fresh tuning cases 400-599, with a halo-snapped mask left without a colour match, 185 background
#: edits of 200 succeed against 171, none lost (README, "the kept subject's ghost").
GHOST_REACH = 0.25

PRESETS: dict[str, EditConfig] = {
    "object": EditConfig(start=NEW_LAYOUT_START, outgrow=OUTGROW, word_inset=WORD_INSET["object"],
                         latent_inset=LATENT_INSET["object"]),
    "attribute": EditConfig(strength=0.8, word_boost_until=500, word_boost_cover=0.99,
                            inner_halo=INNER_HALO),
    "background": EditConfig(latent_blend=0.8, auto_words="subject-outside", halo=8, kept_apart=True,
                             kept_words_negative=True, background_prompt_share=0.25, ghost_reach=GHOST_REACH),
    "multi-object": EditConfig(start=NEW_LAYOUT_START, auto_words=None, outgrow=OUTGROW,
                               word_inset=WORD_INSET["multi-object"], latent_inset=LATENT_INSET["multi-object"]),
    "paper-object": EditConfig(
        blend_blocks=_PAPER_OBJECT_BLOCKS, attention_blocks=_PAPER_OBJECT_ATTENTION, inside=(1, 2), **_PAPER_QUIRKS
    ),
    "paper-background": EditConfig(
        blend_blocks=_PAPER_BACKGROUND_BLOCKS,
        attention_blocks=_PAPER_BACKGROUND_ATTENTION,
        t_combine=200,
        latent_blend=0.8,
        grow=-18,  # the reference dilates the kept object with a 36×36 box (radius 18) at 512 px
        **_PAPER_QUIRKS,
    ),
}

PRESET_HELP = {
    "object": "replace an object inside the mask (new words of the prompt confined to the mask, and once the layout is "
              "set to its core while the latent keeps the band by its edge, so the object is drawn inside the mask's edge)",
    "attribute": "change an attribute (colour, material) of what is inside the mask; starts 80 % noisy, and the old "
                 "background between the mask and the subject stays the photo's own",
    "background": "replace the background (mask = background); the subject's words stay on the kept object, "
                  "the old background left around it joins the mask, and a larger copy of it the model draws "
                  "around it is cleared",
    "multi-object": "several objects at once, each word with its own mask",
    "paper-object": "the official code's COCO object-replacement settings, quirks included",
    "paper-background": "the official code's COCO background settings, quirks included",
}


#: What a family of models changes in a preset, measured on its own ShapesBench model (README, "ShapesBench on
#: the SD3 layout"). On a flow transformer (SD3, Flux) object edits also mask the new words' own text queries:
#: the new object's shape came right in 33 of 80 tuning cases against 24. (Attribute edits boost a word until
#: t = 500 on every family; it was the flow grid that asked first: with its two boosted steps until 700 the new
#: colour was drawn in 17 of 40 tuning cases, with four in 22.) Background edits blend the latent at every step:
#: the early-only blend left the new background a haze over the old one (4 of 40 tuning cases right, 17 with it),
#: while on the U-Net it loses (52 against 45 of 80); and they leave ``kept_apart`` off, which on the toy model's
#: 8 × 8 token grid changed the kept object more often (9 of 40 against 16). Every edit blends the first quarter of
#: the blocks, not half: on the model trained to 14,370 steps that drew 51 against 44 of 80 tuning objects and 43
#: against 39 backgrounds; on the one trained to 17,825 steps 66 against 61 of 80 attributes and 30 against 20 two
#: objects, at seams about 1 higher. Two-object edits leave ``outgrow`` off: the toy decoder's stray colours by the
#: mask's edge made it draw no gain there (31 against 29 of 80 tuning cases) at a seam error 12.6 → 18.5, where
#: single objects gained (55 against 49). A joint attention has no cross-attention output to share with a subject-free
#: background prompt, so that is off. The latent core (``LATENT_INSET``) gains more here than on the U-Nets: on
#: `shapes-sd3`'s tuning cases 200-259, 46 against 41 of 60 objects and 29 against 24 pairs (seam gradient error
#: 16.4 -> 13.0 and 12.0 -> 10.9), with the single objects' words' core kept at 0.08 (0.04 was measured on the U-Net).
#: Object and two-object edits keep the inverted start: the new layout's noise in the mask (``NEW_LAYOUT_START``) drew
#: 40 of 60 tuning objects against 46, and 25 of 60 pairs against 29.
FAMILY_PRESETS: dict[str, dict[str, dict]] = {
    "flow": {"object": dict(text_queries=True, blend_depth=0.25, word_inset=0.08, start="inverted"),
             "attribute": dict(blend_depth=0.25),
             "background": dict(latent_blend=-1.0, kept_apart=False, blend_depth=0.25, background_prompt_share=0.0),
             "multi-object": dict(blend_depth=0.25, outgrow=0.0, start="inverted")},
}
FAMILY_NAMES = {"flow": "SD3 and Flux"}


def get_preset(name: str, family: str | None = None, **overrides) -> EditConfig:
    """The named preset as ``family`` runs it (``FAMILY_PRESETS``; None: as a U-Net does) with ``overrides``
    applied; unknown names are a one-line error listing the choices."""
    if name not in PRESETS:
        raise PFBDiffError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**{**FAMILY_PRESETS.get(family, {}).get(name, {}), **overrides})
