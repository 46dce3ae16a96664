"""Attention masking inside joint attention (docs/method.md §15): in every masked SD3 / Flux block, an image token
outside a word's region cannot see the word, exactly, and nothing changes where nothing is blocked."""

import pytest
import torch
from helpers import LATENT, tiny_flux_transformer, tiny_sd3_transformer

from pfbdiff.engine.attention import AttentionMasking, RegionPrompt, TokenRegion
from pfbdiff.engine.backbones.transformer import FeatureTransformer
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.joint_attention import joint_attention, joint_attention_masking_installed, text_share_kept

GRID = (LATENT // 2, LATENT // 2)
TEXT, WORD = 6, 2  # text tokens, and the position of the confined word


def _region() -> EditMask:
    grid = torch.zeros(1, 1, *GRID)
    grid[..., :, :1] = 1
    grid[..., 0, :] = 1
    return EditMask(grid)


def _attention_call(walker, block, image, text, part="image", computed=None):
    """The block's attention on (image, text) as the model calls it (or, given a bias ``computed``, as
    :func:`joint_attention` computes it); returns its image (or text) tokens' output."""
    attn = block.module.attn
    if computed is not None:
        def attn(hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
            return joint_attention(block.module.attn, hidden_states, encoder_hidden_states, computed,
                                   text_first=walker.flux, rotary=image_rotary_emb)
    if not walker.flux:
        return attn(hidden_states=image, encoder_hidden_states=text)[0 if part == "image" else 1]
    rows, cols = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    rope = walker.model.pos_embed(torch.cat([torch.zeros(TEXT, 3), img_ids]))
    if block.kind == "single":
        out = attn(hidden_states=torch.cat([text, image], 1), image_rotary_emb=rope)
        return out[:, TEXT:] if part == "image" else out[:, :TEXT]
    return attn(hidden_states=image, encoder_hidden_states=text, image_rotary_emb=rope)[0 if part == "image" else 1]


def _blocks():
    cases = []
    for family, make in (("sd3", tiny_sd3_transformer), ("flux", tiny_flux_transformer)):
        walker = FeatureTransformer(make())
        for block in walker.blocks:
            cases.append(pytest.param(walker, block, id=f"{family}-{block.kind}-{block.index}"))
    return cases


def _inputs(walker):
    width = walker.blocks[0].module.attn.to_q.in_features
    torch.manual_seed(3)
    image, text = torch.randn(1, GRID[0] * GRID[1], width), torch.randn(1, TEXT, width)
    other = text.clone()
    other[:, WORD] = torch.randn(width)  # only the confined word differs
    return image, text, other


@pytest.mark.parametrize("walker, block", _blocks())
def test_image_tokens_outside_a_words_region_do_not_see_the_word(walker, block):
    controller = AttentionMasking([TokenRegion((WORD,), _region())], GRID, {block.index})
    controller.active = True
    image, text, other = _inputs(walker)
    with torch.no_grad(), joint_attention_masking_installed(walker, controller):
        one, two = _attention_call(walker, block, image, text), _attention_call(walker, block, image, other)
    outside = ~_region().binary_at(GRID).reshape(-1)
    assert torch.equal(one[:, outside], two[:, outside])  # exactly: the word has zero weight there
    assert not torch.equal(one[:, ~outside], two[:, ~outside])  # inside its region the word still acts


@pytest.mark.parametrize("walker, block", _blocks())
def test_with_text_queries_masked_a_word_reads_only_the_image_inside_its_region(walker, block):
    controller = AttentionMasking([TokenRegion((WORD,), _region())], GRID, {block.index})
    controller.active = True
    image, text, _ = _inputs(walker)
    outside = ~_region().binary_at(GRID).reshape(-1)
    moved = image.clone()
    moved[:, outside] = torch.randn(int(outside.sum()), image.shape[-1])  # only the image outside the region
    results = {}
    for text_queries in (False, True):
        with torch.no_grad(), joint_attention_masking_installed(walker, controller, text_queries=text_queries):
            results[text_queries] = [_attention_call(walker, block, picture, text, "text")[:, WORD]
                                     for picture in (image, moved)]
    assert torch.equal(*results[True])  # the word's own text state: blind to the image outside its region
    assert not torch.equal(*results[False])  # one direction only (the default): it reads the whole image


@pytest.mark.parametrize("walker, block", _blocks())
def test_kept_apart_the_edit_regions_image_tokens_cannot_read_the_kept_region_in_the_conditional_rows(walker, block):
    # a background edit: the kept subject is the region, the rest is edited; row 0 unconditional, row 1 conditional
    kept = _region()
    controller = AttentionMasking([], GRID, {block.index}, kept_apart=kept)
    controller.active, controller.unconditional_rows = True, 1
    image, text, _ = _inputs(walker)
    image, text = image.repeat(2, 1, 1), text.repeat(2, 1, 1)
    inside_kept = kept.binary_at(GRID).reshape(-1)
    other = image.clone()
    other[:, inside_kept] = torch.randn(int(inside_kept.sum()), image.shape[-1])  # only the kept region differs
    with torch.no_grad(), joint_attention_masking_installed(walker, controller):
        one, two = _attention_call(walker, block, image, text), _attention_call(walker, block, other, text)
    assert torch.equal(one[1, ~inside_kept], two[1, ~inside_kept])  # exactly: the edit region did not read it
    assert not torch.equal(one[0, ~inside_kept], two[0, ~inside_kept])  # the unconditional row still reads it
    assert not torch.equal(one[1, inside_kept], two[1, inside_kept])  # and the kept region reads itself


@pytest.mark.parametrize("walker, block", _blocks())
def test_a_regions_own_prompt_replaces_the_edits_prompt_inside_its_region_and_nowhere_else(walker, block):
    # the region's prompt rides after the edit's prompt (its last OWN tokens); row 0 unconditional, row 1 conditional
    own, region = 3, _region()
    controller = AttentionMasking([], GRID, {block.index}, region_prompts=[RegionPrompt(torch.zeros(1, own, 1), region)])
    controller.active, controller.unconditional_rows = True, 1
    image, text, _ = _inputs(walker)
    image, text = image.repeat(2, 1, 1), text.repeat(2, 1, 1)
    inside = region.binary_at(GRID).reshape(-1)
    edits_prompt_changed, own_prompt_changed, image_outside_changed = text.clone(), text.clone(), image.clone()
    edits_prompt_changed[:, : TEXT - own] = torch.randn(TEXT - own, text.shape[-1])
    own_prompt_changed[:, TEXT - own:] = torch.randn(own, text.shape[-1])
    image_outside_changed[:, ~inside] = torch.randn(int((~inside).sum()), image.shape[-1])
    image_inside_changed = image.clone()
    image_inside_changed[:, inside] = torch.randn(int(inside.sum()), image.shape[-1])
    with torch.no_grad(), joint_attention_masking_installed(walker, controller):
        plain = _attention_call(walker, block, image, text)
        edits, owns = (_attention_call(walker, block, image, changed) for changed in (edits_prompt_changed,
                                                                                       own_prompt_changed))
        texts = [_attention_call(walker, block, picture, text, "text")[1, TEXT - own:]
                 for picture in (image, image_outside_changed, image_inside_changed)]
    assert torch.equal(edits[1, inside], plain[1, inside])  # inside: blind to the edit's prompt, exactly
    assert not torch.equal(edits[1, ~inside], plain[1, ~inside])  # outside: reads it
    assert torch.equal(owns[1, ~inside], plain[1, ~inside])  # outside: blind to the region's prompt, exactly
    assert not torch.equal(owns[1, inside], plain[1, inside])  # inside: reads it
    assert torch.equal(owns[0], plain[0])  # the unconditional row never reads the appended tokens
    assert torch.equal(texts[0], texts[1]) and not torch.equal(texts[0], texts[2])  # its prompt reads its region


@pytest.mark.parametrize("walker, block", _blocks())
@pytest.mark.parametrize("case", ["inactive", "other block", "region everywhere"])
def test_masking_with_nothing_blocked_is_the_blocks_own_attention_bit_for_bit(walker, block, case):
    region = EditMask(torch.ones(1, 1, *GRID)) if case == "region everywhere" else _region()
    controller = AttentionMasking([TokenRegion((WORD,), region)], GRID,
                                  {block.index + 100} if case == "other block" else {block.index})
    controller.active = case != "inactive"
    image, text, _ = _inputs(walker)
    with torch.no_grad():
        plain = _attention_call(walker, block, image, text)
        with joint_attention_masking_installed(walker, controller):
            masked = _attention_call(walker, block, image, text)
    assert torch.equal(masked, plain)


@pytest.mark.parametrize("walker, block", _blocks())
def test_the_computed_joint_attention_is_the_stock_attention_when_the_bias_is_zero(walker, block):
    # where a bias is needed the attention is computed here, not by the block's processor: it must be the same
    # attention, in the family's token order and position embedding (the last SD3 block has no text output)
    image, text, _ = _inputs(walker)
    joined = image.shape[1] + TEXT
    for part in ("image", "text"):
        with torch.no_grad():
            stock = _attention_call(walker, block, image, text, part)
            ours = _attention_call(walker, block, image, text, part, computed=torch.zeros(1, 1, joined, joined))
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("walker, block", _blocks())
def test_the_word_boost_acts_only_while_its_gate_is_open(walker, block):
    # the joint bias is shared by the blocks of a step; it must follow the boost's gate from step to step
    controller = AttentionMasking([TokenRegion((WORD,), _region())], GRID, {block.index}, word_boost=8.0,
                                  word_boost_until=700)
    plain = AttentionMasking([TokenRegion((WORD,), _region())], GRID, {block.index})
    controller.active = plain.active = True
    image, text, _ = _inputs(walker)
    outputs = {}
    with torch.no_grad():
        with joint_attention_masking_installed(walker, plain):
            outputs["masked"] = _attention_call(walker, block, image, text)
        with joint_attention_masking_installed(walker, controller):
            for timestep in (900, 500, 900):
                controller.timestep = timestep
                outputs[timestep] = outputs.get(timestep, []) + [_attention_call(walker, block, image, text)]
    assert torch.equal(outputs[500][0], outputs["masked"])  # below the gate: the plain masked attention
    assert not torch.allclose(outputs[900][0], outputs["masked"])  # above it: boosted
    assert torch.equal(outputs[900][0], outputs[900][1])


@pytest.mark.parametrize("walker, block", _blocks())
def test_once_the_layout_is_settled_image_tokens_outside_the_regions_core_do_not_see_the_word(walker, block):
    region = _region()
    core = torch.zeros(1, 1, *GRID)
    core[..., 0, :1] = 1
    region.core = EditMask(core)  # word_inset: the word acts on the core from the boost's gate on
    controller = AttentionMasking([TokenRegion((WORD,), region)], GRID, {block.index}, word_boost_until=700)
    controller.active = True
    image, text, other = _inputs(walker)
    for timestep, allowed in ((900, region), (700, region.core)):
        controller.timestep = timestep
        with torch.no_grad(), joint_attention_masking_installed(walker, controller):
            one, two = _attention_call(walker, block, image, text), _attention_call(walker, block, image, other)
        outside = ~allowed.binary_at(GRID).reshape(-1)
        assert torch.equal(one[:, outside], two[:, outside])  # exactly zero weight outside the allowed cells
        assert not torch.equal(one[:, ~outside], two[:, ~outside])
    assert (region.binary_at(GRID) & ~region.core.binary_at(GRID)).any()  # the band the core leaves out


def test_a_boosted_word_gains_odds_against_the_text_only_and_the_image_keeps_its_share():
    # in joint attention one softmax runs over image and text keys; the boost must act as in a U-Net's
    # cross-attention (a softmax over the text alone): the image keys' weights stay as without it
    torch.manual_seed(0)
    queries, image_keys, text_keys, word, boost = 5, 7, 4, 1, 3.0
    image_logits, text_logits = torch.randn(queries, image_keys), torch.randn(queries, text_keys)
    blocked = torch.finfo(torch.float32).min
    unboosted = torch.zeros(queries, text_keys)
    unboosted[3:, word] = blocked  # queries 3 and 4 are outside the word's region
    boosted = unboosted.clone()
    boosted[:3, word] += boost
    kept = text_share_kept(text_logits, boosted, unboosted)

    def attention(text_bias):
        return torch.softmax(torch.cat([image_logits, text_logits + text_bias], -1), -1)

    before, after = attention(unboosted), attention(kept)
    torch.testing.assert_close(after[:, :image_keys], before[:, :image_keys], rtol=1e-6, atol=1e-7)
    odds_before = before[:3, image_keys + word] / before[:3, image_keys + 2]
    odds_after = after[:3, image_keys + word] / after[:3, image_keys + 2]
    torch.testing.assert_close(odds_after / odds_before, torch.full((3,), boost).exp(), rtol=1e-5, atol=0)
    assert torch.all(after[3:, image_keys + word] == 0)  # still exactly zero outside the region
    assert torch.equal(after[3:], before[3:])  # unboosted queries are untouched
    # the plain additive bias would take the boost's weight from the image keys too
    assert torch.all(attention(boosted)[:3, :image_keys].sum(-1) < before[:3, :image_keys].sum(-1))


def test_installed_processors_are_restored():
    walker = FeatureTransformer(tiny_flux_transformer())
    before = [block.module.attn.processor for block in walker.blocks]
    controller = AttentionMasking([], GRID, {block.index for block in walker.blocks})
    with joint_attention_masking_installed(walker, controller):
        assert all(block.module.attn.processor is not p for block, p in zip(walker.blocks, before))
    assert [block.module.attn.processor for block in walker.blocks] == before
