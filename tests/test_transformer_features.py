"""Feature blending on flow transformers (docs/method.md §14): the image tokens after each block are PFB-Diff's
features, blended on the token grid in the model's packing order; text tokens are never touched."""

import pytest
import torch
from helpers import LATENT, tiny_flux_transformer, tiny_sd3_transformer

from pfbdiff.engine.backbones.transformer import FeatureTransformer
from pfbdiff.engine.blending import FeatureBlender
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.inversion import FeatureRecorder
from pfbdiff.errors import PFBDiffError


def _inputs(family: str, seed: int, text_seed: int, pooled_seed: int | None = None) -> dict:
    """One row of model inputs; the text tokens and the pooled vector come from their own seeds."""
    torch.manual_seed(seed)
    text = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(text_seed))
    pooled = torch.randn(1, 8, generator=torch.Generator().manual_seed(seed if pooled_seed is None else pooled_seed))
    if family == "sd3":
        return dict(hidden_states=torch.randn(1, 4, LATENT, LATENT), encoder_hidden_states=text,
                    pooled_projections=pooled, timestep=torch.tensor([500.0]))
    rows, cols = torch.meshgrid(torch.arange(LATENT // 2), torch.arange(LATENT // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return dict(hidden_states=torch.randn(1, (LATENT // 2) ** 2, 16), encoder_hidden_states=text,
                pooled_projections=pooled, timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=torch.zeros(6, 3))


def _mask() -> EditMask:
    """Whole tokens (2 × 2 latent pixels), placed asymmetrically so a transposed packing would show."""
    latent = torch.zeros(1, 1, LATENT, LATENT)
    latent[..., 0:4, 2:8] = 1
    latent[..., 6:8, 0:2] = 1
    return EditMask(latent)


def _outside(family: str, output: torch.Tensor) -> torch.Tensor:
    """The part of the model's output that lies outside the mask (SD3: latent pixels; Flux: packed tokens)."""
    if family == "sd3":
        return output[(_mask().latent == 0).expand_as(output)]
    keep = _mask().at((LATENT // 2, LATENT // 2)).reshape(-1) == 0
    return output[:, keep]


MODELS = {"sd3": tiny_sd3_transformer, "flux": tiny_flux_transformer}


@pytest.mark.parametrize("family", MODELS)
def test_blocks_run_in_order_joint_for_sd3_then_double_and_single_for_flux(family):
    walker = FeatureTransformer(MODELS[family]())
    kinds = [block.kind for block in walker.blocks]
    assert kinds == (["joint"] * 3 if family == "sd3" else ["double", "double", "single", "single"])
    assert [block.index for block in walker.blocks] == list(range(1, len(kinds) + 1))
    assert walker.window(0.5) == (1, 2) and walker.window(1.0)[-1] == len(kinds)
    assert walker.window(0.0) == ()
    with pytest.raises(PFBDiffError, match="blend_depth"):
        walker.window(1.5)


@pytest.mark.parametrize("family", MODELS)
def test_a_walk_that_changes_nothing_equals_the_model_bit_for_bit(family):
    model = MODELS[family]()
    walker = FeatureTransformer(model)
    inputs = _inputs(family, seed=1, text_seed=2)
    with torch.no_grad():
        plain = model(**inputs, return_dict=False)[0]
        recorder = FeatureRecorder([block.index for block in walker.blocks])
        assert torch.equal(walker(**inputs), plain)
        assert torch.equal(walker(on_block=recorder, **inputs), plain)
    assert all(h.shape == (1, h.shape[1], LATENT // 2, LATENT // 2) for h in recorder.features.values())


@pytest.mark.parametrize("family", MODELS)
def test_blending_every_block_with_the_source_pooled_vector_gives_the_source_output_outside_the_mask(family):
    """The transformer analogue of the U-Net suite's locality property: other words, same pooled vector and
    timestep, every block's image tokens blended → outside the mask the output is exactly the source's."""
    walker = FeatureTransformer(MODELS[family]())
    every = [block.index for block in walker.blocks]
    source_inputs = _inputs(family, seed=1, text_seed=2)
    target_inputs = _inputs(family, seed=1, text_seed=3)
    with torch.no_grad():
        recorder = FeatureRecorder(every)
        source = walker(on_block=recorder, **source_inputs)
        plain_target = walker(**target_inputs)
        blended = walker(on_block=FeatureBlender(recorder.features, _mask(), every), **target_inputs)
    assert not torch.equal(_outside(family, plain_target), _outside(family, source))  # the words do reach it
    assert torch.equal(_outside(family, blended), _outside(family, source))
    assert not torch.equal(blended, source)  # inside the mask the edit's words act


@pytest.mark.parametrize("family", MODELS)
def test_the_target_pooled_vector_reaches_the_tokens_outside_the_mask_even_when_every_block_is_blended(family):
    """The pooled vector modulates every block and the output norm, so blending cannot keep it out: this is
    why ``pooled_from`` is a setting (docs/method.md §12)."""
    walker = FeatureTransformer(MODELS[family]())
    every = [block.index for block in walker.blocks]
    with torch.no_grad():
        recorder = FeatureRecorder(every)
        source = walker(on_block=recorder, **_inputs(family, seed=1, text_seed=2))
        other_pooled = _inputs(family, seed=1, text_seed=3, pooled_seed=9)
        blended = walker(on_block=FeatureBlender(recorder.features, _mask(), every), **other_pooled)
    assert not torch.equal(_outside(family, blended), _outside(family, source))


def test_flux_needs_its_image_ids_to_place_the_tokens():
    walker = FeatureTransformer(tiny_flux_transformer())
    inputs = _inputs("flux", seed=1, text_seed=2)
    assert walker.token_grid(inputs["hidden_states"], inputs["img_ids"]) == (LATENT // 2, LATENT // 2)
    with pytest.raises(PFBDiffError, match="img_ids"):
        walker.token_grid(inputs["hidden_states"])
