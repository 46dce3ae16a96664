"""DDIM inversion (docs/method.md §2) and the source-feature cache (§2, §10 properties 8, 9, 12)."""

import pytest
import torch

from pfbdiff.engine.loop import recomputed_source_features
from pfbdiff.errors import PFBDiffError


def test_inversion_keeps_all_k_plus_one_latents_and_features_per_step(tiny_pipe, photo):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=10, strength=0.5)
    assert inv.inverted_steps == 5 and len(inv.latents) == 6 and len(inv.features) == 5
    assert inv.latents[0].shape == (1, 4, 12, 16)  # 128×96 image, factor-8 VAE, aspect kept
    assert set(inv.features[0]) == set(inv.recorded_blocks) >= set(range(7, 19))


def test_inversion_uses_the_source_prompt_without_guidance(tiny_pipe, photo):
    a = tiny_pipe.invert(photo, "a cat", num_inference_steps=3)
    b = tiny_pipe.invert(photo, "a dog", num_inference_steps=3)
    assert torch.equal(a.latents[0], b.latents[0]) and not torch.equal(a.latents[-1], b.latents[-1])


def test_recorded_features_equal_the_source_branch_of_each_edit_step(tiny_pipe, photo):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=4)
    recompute = recomputed_source_features(tiny_pipe.feature_unet, inv.latents, inv.source_embeddings, inv.recorded_blocks)
    for n, t in enumerate(inv.grid.timesteps):
        live = recompute(n, t)
        assert all(torch.equal(live[k], inv.features[n][k]) for k in inv.recorded_blocks)


@pytest.mark.parametrize("preset", ["object", "paper-object"])
def test_cached_and_recomputed_source_features_give_identical_edits(tiny_pipe, photo, box_mask, preset):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=4)
    cached, live = (tiny_pipe.edit(inv, box_mask, "a dog", preset=preset, cache_source=cache, output_type="latent",
                                   generator=torch.Generator().manual_seed(0)).images for cache in (True, False))
    assert torch.equal(cached, live)


def test_first_edit_costs_k_plus_2k_evaluations_and_a_second_edit_2k(tiny_pipe, photo, box_mask):
    unet, k = tiny_pipe.feature_unet, 5
    start = unet.evaluations
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=k)
    tiny_pipe.edit(inv, box_mask, "a dog")
    assert unet.evaluations - start == k + 2 * k
    start, calls = unet.evaluations, unet.calls
    tiny_pipe.edit(inv, box_mask, "a fox on a cat")
    assert (unet.evaluations - start, unet.calls - calls) == (2 * k, k)


def test_paper_presets_take_the_reference_path_of_k_plus_3k_calls(tiny_pipe, photo, box_mask):
    unet, k = tiny_pipe.feature_unet, 5
    start = unet.calls
    tiny_pipe(photo, box_mask, "a dog", "a cat", preset="paper-object", num_inference_steps=k)
    assert unet.calls - start == k + 3 * k


def test_two_runs_with_one_seed_are_identical(tiny_pipe, photo, box_mask):
    first, second = (tiny_pipe(photo, box_mask, "a dog", "a cat", num_inference_steps=4, output_type="np",
                               generator=torch.Generator().manual_seed(0)).images for _ in range(2))
    assert (first == second).all()


def test_strength_out_of_range_is_refused(tiny_pipe, photo):
    for strength in (0.0, 1.5):
        with pytest.raises(PFBDiffError, match="strength"):
            tiny_pipe.invert(photo, "a cat", num_inference_steps=4, strength=strength)


def test_an_edit_may_use_fewer_inverted_steps_but_not_more(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=10, strength=0.5)
    with pytest.raises(PFBDiffError, match="inverted steps"):
        tiny_pipe.edit(inv, box_mask, "a dog", strength=1.0)
    start = tiny_pipe.feature_unet.evaluations
    tiny_pipe.edit(inv, box_mask, "a dog", strength=0.3)
    assert tiny_pipe.feature_unet.evaluations - start == 2 * 3
