"""Attention masking inside joint attention (docs/method.md §15): in every masked SD3 / Flux block, an image token
outside a word's region cannot see the word, exactly, and nothing changes where nothing is blocked."""

import pytest
import torch
from helpers import LATENT, tiny_flux_transformer, tiny_sd3_transformer

from pfbdiff.engine.attention import AttentionMasking, TokenRegion
from pfbdiff.engine.backbones.transformer import FeatureTransformer
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.joint_attention import joint_attention_masking_installed, sd3_joint_attention

GRID = (LATENT // 2, LATENT // 2)
TEXT, WORD = 6, 2  # text tokens, and the position of the confined word


def _region() -> EditMask:
    grid = torch.zeros(1, 1, *GRID)
    grid[..., :, :1] = 1
    grid[..., 0, :] = 1
    return EditMask(grid)


def _attention_call(walker, block, image, text, part="image"):
    """The block's attention on (image, text) as the model calls it; returns its image (or text) tokens' output."""
    attn = block.module.attn
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


def test_sd3s_masked_attention_is_the_stock_attention_when_the_bias_is_zero():
    walker = FeatureTransformer(tiny_sd3_transformer())
    image, text, _ = _inputs(walker)
    for block in walker.blocks:  # the last block is context_pre_only: no text output projection
        attn = block.module.attn
        with torch.no_grad():
            stock = attn(hidden_states=image, encoder_hidden_states=text)
            ours = sd3_joint_attention(attn, image, text, torch.zeros(1, 1, image.shape[1] + TEXT, image.shape[1] + TEXT))
        for a, b in zip(stock, ours):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_installed_processors_are_restored():
    walker = FeatureTransformer(tiny_flux_transformer())
    before = [block.module.attn.processor for block in walker.blocks]
    controller = AttentionMasking([], GRID, {block.index for block in walker.blocks})
    with joint_attention_masking_installed(walker, controller):
        assert all(block.module.attn.processor is not p for block, p in zip(walker.blocks, before))
    assert [block.module.attn.processor for block in walker.blocks] == before
