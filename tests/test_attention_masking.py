"""Attention masking (docs/method.md §5, §10 property 7): masked words get exactly zero attention outside their region."""

import numpy as np
import pytest
import torch

from pfbdiff.engine.attention import (
    AttentionMasking,
    KeptApartSelfAttention,
    MaskedCrossAttention,
    RegionPrompt,
    TokenRegion,
    attention_masking_installed,
    background_prompts,
    confined_words,
    negative_prompts,
    regional_prompts,
)
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.presets import get_preset
from pfbdiff.engine.tokens import token_positions
from pfbdiff.errors import PFBDiffError
from pfbdiff.io.tensors import mask_to_tensor


def _left_half(size=(16, 16)):
    latent = torch.zeros(1, 1, *size)
    latent[..., : size[1] // 2] = 1.0
    return EditMask(latent)


def _cross_attention(tiny_pipe):
    block = next(b for b in tiny_pipe.feature_unet.blocks if b.index == 8)
    return block, block.cross_attentions[0]


def _run(tiny_pipe, controller, batch=2, unconditional_rows=1):
    block, attn = _cross_attention(tiny_pipe)
    torch.manual_seed(0)
    pixels = (16 // 4) * (16 // 4)  # block 8 runs at level 2 of a 16×16 latent
    hidden = torch.randn(batch, pixels, attn.to_q.in_features)
    context = torch.randn(batch, 77, attn.to_k.in_features)
    seen = {}
    controller.unconditional_rows = unconditional_rows
    controller.observer = lambda index, probs: seen.setdefault("probs", probs)
    processor = MaskedCrossAttention(controller, block.index, attn.processor)
    with torch.no_grad():
        out = processor(attn, hidden, context)
        plain = attn.processor(attn, hidden, context)
    return out, plain, seen.get("probs")


def test_inside_word_gets_zero_attention_outside_the_mask_and_rows_sum_to_one(tiny_pipe):
    controller = AttentionMasking([TokenRegion((2, 3), _left_half())], (16, 16), {8})
    controller.active = True
    _, _, probs = _run(tiny_pipe, controller)
    inside = _left_half().binary_at((4, 4)).reshape(-1)
    cond = probs[1]  # heads × pixels × tokens of the conditional row
    assert torch.all(cond[:, ~inside][..., [2, 3]] == 0)
    assert torch.all(cond[:, inside][..., [2, 3]] > 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert torch.all(probs[0][..., [2, 3]] > 0)  # unconditional row untouched by default


def test_the_word_boost_multiplies_a_words_odds_inside_its_region_by_e_to_the_boost_in_the_early_steps(tiny_pipe):
    """Against another token, a boosted word's attention inside its region gains exactly a factor e^b (the
    logits gain b), in the conditional row only; outside its region it stays zero; below the gate's timestep
    nothing is boosted."""
    boost = 2.0
    plain, boosted = (AttentionMasking([TokenRegion((2, 3), _left_half())], (16, 16), {8}, word_boost=b,
                                       word_boost_until=500) for b in (0.0, boost))
    for controller in (plain, boosted):
        controller.active, controller.timestep = True, 800
    _, _, before = _run(tiny_pipe, plain)
    _, _, after = _run(tiny_pipe, boosted)
    inside = _left_half().binary_at((4, 4)).reshape(-1)
    odds_before = before[1][:, inside][..., 2] / before[1][:, inside][..., 5]
    odds_after = after[1][:, inside][..., 2] / after[1][:, inside][..., 5]
    torch.testing.assert_close(odds_after / odds_before, torch.full_like(odds_after, float(np.exp(boost))))
    assert torch.all(after[1][:, ~inside][..., [2, 3]] == 0)
    torch.testing.assert_close(after[0], before[0])  # the unconditional row is not boosted
    boosted.timestep = 400  # past the gate: the plain masking, bit for bit
    _, _, late = _run(tiny_pipe, boosted)
    assert torch.equal(late, before)


def test_the_word_boost_pulls_a_word_only_into_the_cells_its_region_covers_by_more_than_the_cover_share(tiny_pipe):
    """With ``word_boost_cover`` = 0.99, a cell three quarters inside the region still lets the word in (masking
    thresholds at a half) but does not boost it; the cells wholly inside gain exactly e^b, as with the default."""
    latent = torch.zeros(1, 1, 16, 16)
    latent[..., :11] = 1.0  # at 4 × 4: two columns of cells wholly inside, one three quarters inside
    region = EditMask(latent)
    plain, core = (AttentionMasking([TokenRegion((2, 3), region)], (16, 16), {8}, word_boost=b, word_boost_until=500,
                                    word_boost_cover=0.99) for b in (0.0, 2.0))
    for controller in (plain, core):
        controller.active, controller.timestep = True, 800
    _, _, before = _run(tiny_pipe, plain)
    _, _, after = _run(tiny_pipe, core)
    columns = torch.arange(16) % 4
    wholly, edge, outside = columns < 2, columns == 2, columns == 3
    gain = (after[1][..., 2] / after[1][..., 5]) / (before[1][..., 2] / before[1][..., 5])
    torch.testing.assert_close(gain[:, wholly], torch.full_like(gain[:, wholly], float(np.exp(2.0))))
    torch.testing.assert_close(gain[:, edge], torch.ones_like(gain[:, edge]))
    assert torch.all(after[1][:, edge][..., 2] > 0) and torch.all(after[1][:, outside][..., [2, 3]] == 0)


def test_outside_word_gets_zero_attention_inside_the_mask(tiny_pipe):
    controller = AttentionMasking([TokenRegion((4,), _left_half().complement())], (16, 16), {8})
    controller.active = True
    _, _, probs = _run(tiny_pipe, controller)
    inside = _left_half().binary_at((4, 4)).reshape(-1)
    assert torch.all(probs[1][:, inside][..., 4] == 0)


def test_reference_quirk_also_masks_the_unconditional_pass(tiny_pipe):
    controller = AttentionMasking([TokenRegion((2,), _left_half())], (16, 16), {8}, mask_uncond=True)
    controller.active = True
    _, _, probs = _run(tiny_pipe, controller)
    outside = ~_left_half().binary_at((4, 4)).reshape(-1)
    assert torch.all(probs[0][:, outside][..., 2] == 0) and torch.all(probs[1][:, outside][..., 2] == 0)


@pytest.mark.parametrize("mask_uncond", [False, True])
def test_sequential_passes_mask_the_unconditional_pass_only_with_the_reference_flag(tiny_pipe, mask_uncond):
    controller = AttentionMasking([TokenRegion((2,), _left_half())], (16, 16), {8}, mask_uncond=mask_uncond)
    controller.active = True
    outside = ~_left_half().binary_at((4, 4)).reshape(-1)
    _, _, uncond_probs = _run(tiny_pipe, controller, batch=1, unconditional_rows=1)
    _, _, cond_probs = _run(tiny_pipe, controller, batch=1, unconditional_rows=0)
    assert torch.all(cond_probs[0][:, outside][..., 2] == 0)
    if mask_uncond:
        assert torch.all(uncond_probs[0][:, outside][..., 2] == 0)
    else:
        assert uncond_probs is None  # nothing blocked in that pass: the original processor ran


@pytest.mark.parametrize("case", ["no words", "inactive", "full mask", "other block"])
def test_masking_with_nothing_blocked_is_a_bitwise_no_op(tiny_pipe, case):
    regions = [] if case == "no words" else [TokenRegion((2,), _left_half() if case != "full mask" else EditMask(torch.ones(1, 1, 16, 16)))]
    controller = AttentionMasking(regions, (16, 16), {9} if case == "other block" else {8})
    controller.active = case != "inactive"
    out, plain, probs = _run(tiny_pipe, controller)
    assert torch.equal(out, plain) and probs is None


def _self_attention_outputs(tiny_pipe, controller, hidden):
    block = next(b for b in tiny_pipe.feature_unet.blocks if b.index == 8)
    attn = block.self_attentions[0]
    with torch.no_grad():
        return KeptApartSelfAttention(controller, block.index, attn.processor)(attn, hidden)


def test_kept_apart_the_edit_regions_self_attention_cannot_read_the_kept_region_in_the_conditional_rows(tiny_pipe):
    # a background edit: the mask (edit region) is the left half, the kept subject the right half
    kept = _left_half().complement()
    controller = AttentionMasking([], (16, 16), {8}, kept_apart=kept)
    controller.active, controller.unconditional_rows = True, 1
    torch.manual_seed(0)
    width = next(b for b in tiny_pipe.feature_unet.blocks if b.index == 8).self_attentions[0].to_q.in_features
    hidden = torch.randn(2, 16, width)  # block 8 runs at 4×4 on a 16×16 latent
    inside_kept = kept.binary_at((4, 4)).reshape(-1)
    other = hidden.clone()
    other[:, inside_kept] = torch.randn(int(inside_kept.sum()), width)  # only the kept region differs
    one, two = _self_attention_outputs(tiny_pipe, controller, hidden), _self_attention_outputs(tiny_pipe, controller, other)
    assert torch.equal(one[1, ~inside_kept], two[1, ~inside_kept])  # exactly: the edit region did not read it
    assert not torch.equal(one[0, ~inside_kept], two[0, ~inside_kept])  # the unconditional row still reads it
    assert not torch.equal(one[1, inside_kept], two[1, inside_kept])  # and the kept region reads itself
    controller.active = False  # idle: the layer's own processor, bit for bit
    block = next(b for b in tiny_pipe.feature_unet.blocks if b.index == 8)
    with torch.no_grad():
        plain = block.self_attentions[0].processor(block.self_attentions[0], hidden)
    assert torch.equal(_self_attention_outputs(tiny_pipe, controller, hidden), plain)


def test_installed_processors_are_restored(tiny_pipe):
    unet = tiny_pipe.feature_unet
    before = {id(m): m.processor for b in unet.blocks for m in (*b.cross_attentions, *b.self_attentions)}
    controller = AttentionMasking([], (16, 16), {8, 9, 13}, kept_apart=_left_half())
    with attention_masking_installed(unet, controller):
        assert isinstance(unet.blocks[7].cross_attentions[0].processor, MaskedCrossAttention)
        assert isinstance(unet.blocks[7].self_attentions[0].processor, KeptApartSelfAttention)
    assert {id(m): m.processor for b in unet.blocks for m in (*b.cross_attentions, *b.self_attentions)} == before


def test_multi_object_each_word_attends_only_inside_its_own_mask(tiny_pipe, photo):
    left = np.zeros((96, 128), np.float32)
    left[16:80, 8:56] = 1
    right = np.zeros((96, 128), np.float32)
    right[16:80, 72:120] = 1
    inv = tiny_pipe.invert(photo, "a photo", num_inference_steps=3)
    seen = []
    tiny_pipe.edit(
        inv, prompt="a cat and a rabbit", preset="multi-object", word_masks={"cat": left, "rabbit": right},
        attention_observer=lambda index, probs: seen.append(probs),
    )
    assert seen, "attention masking never ran"
    rabbit = token_positions(tiny_pipe.tokenizer, "a cat and a rabbit", "rabbit")
    for probs in seen:
        size = {h * w: (h, w) for h, w in [(12, 16), (6, 8), (3, 4), (2, 2)]}[probs.shape[-2]]
        for word_mask, positions in ((left, [2]), (right, list(rabbit))):
            region = EditMask.from_pixels(mask_to_tensor(word_mask, (128, 96)), (12, 16))
            outside = ~region.binary_at(size).reshape(-1)
            assert outside.any()
            assert torch.all(probs[1][:, outside][..., positions] == 0)


def test_presets_choose_the_confined_words_unless_the_user_names_them(tiny_pipe):
    tok, source = tiny_pipe.tokenizer, "a red circle on a plain yellow background"
    new_shape = "a blue square on a plain yellow background"
    assert confined_words(tok, get_preset("object"), source, new_shape, {}) == (["blue", "square"], [])
    assert confined_words(tok, get_preset("background"), source, "a red circle on a striped green background", {}) == (
        [], ["red", "circle"])
    given = get_preset("object", inside=("square",))
    assert confined_words(tok, given, source, new_shape, {}) == (["square"], [])
    assert confined_words(tok, get_preset("multi-object"), source, "a blue square", {"blue square": None}) == ([], [])


def test_the_background_preset_adds_the_kept_subjects_words_to_the_negative_prompt(tiny_pipe):
    """Guidance then steers the new background away from the subject; the user's own negative prompt comes first,
    and raw token positions, having no text, are not added."""
    tok, source, target = tiny_pipe.tokenizer, "a red circle on a plain yellow background", "a red circle on grass"
    background = get_preset("background")
    assert negative_prompts(tok, background, ["", "blurry"], [source] * 2, [target] * 2, {}) == [
        "red, circle", "blurry, red, circle"]
    assert negative_prompts(tok, background.replace(outside=(3, "circle")), [""], [source], [target], {}) == ["circle"]
    for unchanged in (get_preset("object"), background.replace(kept_words_negative=False),
                      background.replace(attention_masking=False)):
        assert negative_prompts(tok, unchanged, ["blurry"], [source], [target], {}) == ["blurry"]


def test_a_background_edit_with_the_kept_words_negative_is_the_edit_given_them_as_its_negative_prompt(tiny_pipe, photo):
    mask = np.ones((96, 128), np.float32)
    mask[32:64, 48:80] = 0  # the kept subject
    inv = tiny_pipe.invert(photo, "a cat on a bench", num_inference_steps=3)
    kwargs = dict(prompt="a cat on the grass", preset="background", output_type="latent", guidance_scale=4.0)
    named = tiny_pipe.edit(inv, mask, **kwargs).latents
    by_hand = tiny_pipe.edit(inv, mask, negative_prompt="cat", kept_words_negative=False, **kwargs).latents
    without = tiny_pipe.edit(inv, mask, kept_words_negative=False, **kwargs).latents
    assert torch.equal(named, by_hand) and not torch.equal(named, without)


def test_automatic_words_past_the_token_limit_are_not_confined(tiny_pipe):
    """The text encoder never sees words past its 77 tokens, so there is nothing there to confine."""
    tok, source = tiny_pipe.tokenizer, "a red circle on a plain yellow background"
    long_prompt = "a blue circle on a plain yellow background, " + "very " * 80 + "and a green square"
    inside, _ = confined_words(tok, get_preset("object"), source, long_prompt, {})
    assert inside == ["blue", "very"]


@pytest.mark.parametrize("preset", ["object", "attribute", "background", "multi-object"])
def test_presets_mask_cross_attention_at_every_level_the_full_resolution_one_included(tiny_pipe, preset):
    from pfbdiff import get_preset

    unet = tiny_pipe.feature_unet
    every_cross_attention = tuple(b.index for b in unet.blocks if b.attention_level is not None)
    top = tuple(b.index for b in unet.blocks if b.attention_level == 0)
    masked = unet.attention_blocks_at_levels(get_preset(preset).attention_levels)
    assert top and masked == every_cross_attention


# -- regional prompts: inside a word's region the conditional rows read a prompt of the region's own


def test_a_region_prompt_replaces_the_conditional_rows_attention_inside_its_region_only(tiny_pipe):
    block, attn = _cross_attention(tiny_pipe)
    torch.manual_seed(1)
    own = torch.randn(1, 77, attn.to_k.in_features)
    controller = AttentionMasking([], (16, 16), {8}, region_prompts=[RegionPrompt(own, _left_half())])
    controller.active = True
    out, plain, _ = _run(tiny_pipe, controller, batch=2, unconditional_rows=1)
    torch.manual_seed(0)  # _run's inputs, again, for the region's own pass
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    with torch.no_grad():
        by_own_prompt = attn.processor(attn, hidden[1:], own)
    inside = _left_half().binary_at((4, 4)).reshape(-1)
    assert torch.equal(out[1][inside], by_own_prompt[0][inside])  # inside: exactly the region's own prompt
    assert torch.equal(out[1][~inside], plain[1][~inside])  # outside: the edit's prompt, untouched
    assert torch.equal(out[0], plain[0])  # the unconditional row never reads a region prompt


def test_a_region_prompts_share_mixes_its_output_with_the_edit_prompts_inside_the_region_only(tiny_pipe):
    block, attn = _cross_attention(tiny_pipe)
    torch.manual_seed(1)
    own = torch.randn(1, 77, attn.to_k.in_features)
    whole, shared = (AttentionMasking([], (16, 16), {8}, region_prompts=[RegionPrompt(own, _left_half(), share)])
                     for share in (1.0, 0.25))
    for controller in (whole, shared):
        controller.active = True
    by_own_prompt, plain, _ = _run(tiny_pipe, whole)
    out, _, _ = _run(tiny_pipe, shared)
    inside = _left_half().binary_at((4, 4)).reshape(-1)
    torch.testing.assert_close(out[1][inside], 0.25 * by_own_prompt[1][inside] + 0.75 * plain[1][inside])
    assert torch.equal(out[1][~inside], plain[1][~inside]) and torch.equal(out[0], plain[0])


def test_the_background_prompt_is_the_prompt_without_the_kept_subjects_words(tiny_pipe):
    """Only where a background edit asks for a share, and only when it has subject words to take out."""
    tok, source = tiny_pipe.tokenizer, "a red circle and a blue square on a plain yellow background"
    target = "a red circle and a blue square on a striped green background"
    region, encoded = _left_half(), []

    def encode(texts):
        encoded.append(texts)
        return torch.zeros(len(texts), 77, 8)

    background = get_preset("background", background_prompt_share=0.25)
    [prompt] = background_prompts(encode, tok, background, [source, source], [target, "A Red Circle on grass"], {},
                                  region)
    assert encoded == [["a and a on a striped green background", "A on grass"]]
    assert prompt.region is region and prompt.share == 0.25
    assert background_prompts(encode, tok, background.replace(background_prompt_share=0.0), [source], [target], {},
                              region) == []
    assert background_prompts(encode, tok, background.replace(outside=(3,)), [source], [target], {}, region) == []
    with pytest.raises(PFBDiffError, match="background_prompt_share must be a share in"):
        background.replace(background_prompt_share=1.5)


def test_region_prompts_default_to_their_words_and_must_name_a_word_mask():
    region = _left_half()
    encoded = []
    prompts = regional_prompts(lambda texts: encoded.append(texts) or torch.zeros(len(texts), 77, 8),
                               {"red circle": region, "blue square": region}, {"blue square": "a blue square"}, rows=2,
                               config=get_preset("multi-object"))
    assert encoded == [["red circle"] * 2, ["a blue square"] * 2] and len(prompts) == 2
    with pytest.raises(PFBDiffError, match="region_prompts.*green"):
        regional_prompts(lambda texts: None, {"red circle": region}, {"green": "a green"}, rows=1,
                         config=get_preset("multi-object"))


def test_a_multi_object_edit_with_region_prompts_changes_only_inside_the_regions_before_paste_back(tiny_pipe, photo):
    left = np.zeros((96, 128), np.float32)
    left[16:80, 8:56] = 1
    inv = tiny_pipe.invert(photo, "a photo", num_inference_steps=3)
    kwargs = dict(prompt="a cat and a rabbit", preset="multi-object", word_masks={"cat": left}, output_type="latent",
                  latent_blend=-1.0)  # the latent blend every step: the latent outside the regions is the source's
    plain = tiny_pipe.edit(inv, **kwargs).latents
    regional = tiny_pipe.edit(inv, region_prompts={"cat": "a cat"}, **kwargs).latents
    assert not torch.equal(plain, regional)
    words = tiny_pipe.edit(inv, own_region_prompts=True, **kwargs).latents
    assert not torch.equal(words, regional)  # the default prompt is the word itself, not "a cat"


def test_once_the_layout_is_settled_a_word_attends_only_in_its_regions_core(tiny_pipe):
    region = _left_half()
    core = torch.zeros(1, 1, 16, 16)
    core[..., :4] = 1.0
    region.core = EditMask(core)
    controller = AttentionMasking([TokenRegion((2, 3), region)], (16, 16), {8}, word_boost_until=700)
    controller.active = True
    for timestep, allowed in ((900, region), (700, region.core)):  # the boost's gate settles the layout
        controller.timestep = timestep
        _, _, probs = _run(tiny_pipe, controller)
        inside = allowed.binary_at((4, 4)).reshape(-1)
        assert torch.all(probs[1][:, ~inside][..., [2, 3]] == 0)
        assert torch.all(probs[1][:, inside][..., [2, 3]] > 0)
    assert not torch.equal(region.binary_at((4, 4)), region.core.binary_at((4, 4)))


def test_a_word_inset_gives_each_confined_region_a_core_and_leaves_the_edit_region_whole(tiny_pipe, photo):
    mask = np.zeros((96, 128), np.float32)
    mask[8:88, 8:120] = 1
    inv = tiny_pipe.invert(photo, "a photo", num_inference_steps=3)
    plain = tiny_pipe.prepare_masks(inv, mask, "a photo of a cat", preset="object", word_inset=0.0)
    inset = tiny_pipe.prepare_masks(inv, mask, "a photo of a cat", preset="object", word_inset=0.2)
    assert plain.edit.core is None and torch.equal(inset.edit.latent, plain.edit.latent)  # blending: the whole mask
    assert torch.all(inset.edit.core.latent <= inset.edit.latent)
    assert inset.edit.core.latent.sum() < 0.7 * inset.edit.latent.sum()
    assert inset.edit.complement().core is None  # the kept side's words keep the whole complement
    left, right = np.zeros_like(mask), np.zeros_like(mask)
    left[16:80, 8:56], right[16:80, 72:120] = 1, 1
    words = tiny_pipe.prepare_masks(inv, None, "a cat and a dog", preset="multi-object", word_inset=0.2,
                                    word_masks={"cat": left, "dog": right}).words
    assert all(torch.all(m.core.latent <= m.latent) and m.core.latent.sum() < m.latent.sum() for m in words.values())
    with pytest.raises(PFBDiffError, match="word_inset"):
        get_preset("object", word_inset=1.5)
