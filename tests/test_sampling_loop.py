"""The PFB-Diff loop (docs/method.md §1) against plain sampling: docs/method.md §10 properties 1–4 and 10."""

import numpy as np
import pytest
import torch

from pfbdiff.engine.blending import latent_blend_is_open, noised_reference
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.loop import Prompts, cached_source_features, pfb_sampling_loop, plain_sampling_loop
from pfbdiff.engine.sampling import DDIMGrid
from pfbdiff.models.toy_models import sd_scheduler_config

#: Edit-free settings from the paper's start: nothing blended, no word masked, the latent blend never open.
NO_OP = dict(blend_blocks=(), attention_masking=False, latent_blend=0.98, start="inverted")


def _plain(pipe, x, prompt, steps, batch_cfg=True):
    grid = pipe.ddim_grid(steps)
    prompts = Prompts(source=None, target=pipe.encode_prompt([prompt]), unconditional=pipe.encode_prompt([""]))
    return plain_sampling_loop(pipe.feature_unet, x, grid, prompts, 7.5, num_steps=steps, batch_cfg=batch_cfg)


def test_no_op_config_is_exactly_plain_sampling_from_the_inverted_latent(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=5)
    edited = tiny_pipe.edit(inv, box_mask, "a dog", output_type="latent", **NO_OP).images
    assert torch.equal(edited, _plain(tiny_pipe, inv.latents[-1], "a dog", 5))


def test_no_op_config_ignores_the_source_image_and_prompt(tiny_pipe, photo, box_mask):
    outputs = []
    for image, source in ((photo, "a cat"), (255 - photo, "a bench")):
        inv = tiny_pipe.invert(image, source, num_inference_steps=4)
        g = torch.Generator().manual_seed(3)
        outputs.append(tiny_pipe.edit(inv, box_mask, "a dog", generator=g, output_type="latent",
                                       **{**NO_OP, "start": "noise"}).images)
    assert torch.equal(outputs[0], outputs[1])
    noise = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(outputs[0], _plain(tiny_pipe, noise, "a dog", 4))


def test_noise_in_mask_starts_from_seeded_noise_inside_the_mask_and_the_inverted_latent_outside(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=4)
    g = torch.Generator().manual_seed(3)
    edited = tiny_pipe.edit(inv, box_mask, "a dog", generator=g, output_type="latent",
                            **{**NO_OP, "start": "noise-in-mask"}).images
    inside = tiny_pipe.prepare_masks(inv, box_mask, preset=pipe_config()).edit.latent
    assert set(inside.unique().tolist()) == {0.0, 1.0}  # the box lies on the latent grid: no soft edge to mix
    noise = torch.randn(edited.shape, generator=torch.Generator().manual_seed(3))
    start = torch.where(inside.bool(), noise, inv.latents[-1])
    assert torch.equal(edited, _plain(tiny_pipe, start, "a dog", 4))


def test_noise_in_mask_makes_each_seed_and_each_image_of_a_batch_a_new_layout(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=3)

    def run(start, seed):
        return tiny_pipe.edit(inv, box_mask, "a dog", start=start, num_images_per_prompt=2, output_type="latent",
                              generator=torch.Generator().manual_seed(seed)).images

    fixed = run("inverted", 1)
    assert torch.equal(fixed[0], fixed[1]) and torch.equal(fixed, run("inverted", 2))  # no draw: one edit only
    first, again, other = run("noise-in-mask", 1), run("noise-in-mask", 1), run("noise-in-mask", 2)
    assert torch.equal(first, again)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first, other)


@pytest.mark.parametrize("settings", [dict(), dict(t_combine=500, latent_blend=-1.0), dict(preset="paper-object")])
def test_full_mask_is_exactly_plain_sampling_whatever_the_blend_settings(tiny_pipe, photo, settings):
    """From the start latent: the inverted one (the paper's), or with the object preset's ``noise-in-mask`` the
    seeded noise, since a full mask leaves nothing of the inverted latent."""
    from pfbdiff import get_preset

    full = np.ones((96, 128), np.float32)
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=4)
    with pytest.warns(UserWarning, match="all white"):
        edited = tiny_pipe.edit(inv, full, "a dog", output_type="latent", generator=torch.Generator().manual_seed(4),
                                **settings).images
    preset = settings.get("preset", "object")
    start = inv.latents[-1]
    if get_preset(preset).start == "noise-in-mask":
        start = torch.randn(start.shape, generator=torch.Generator().manual_seed(4))
    sequential = preset.startswith("paper")  # the reference runs the two passes one by one
    assert torch.equal(edited, _plain(tiny_pipe, start, "a dog", 4, batch_cfg=not sequential))


def test_full_mask_blocks_outside_words_everywhere(tiny_pipe, photo):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=2)
    seen = []
    with pytest.warns(UserWarning, match="all white"):
        tiny_pipe.edit(inv, np.ones((96, 128), np.float32), "a dog on a bench", outside=["bench"],
                       attention_observer=lambda index, probs: seen.append(probs))
    assert seen and all(torch.all(p[1][..., 5] == 0) for p in seen)


def _loop_with_constant_mask(pipe, inv, value, s=0.5):
    grid = inv.grid
    mask = EditMask(torch.full_like(inv.latents[0][:, :1], value))
    prompts = Prompts(inv.source_embeddings, pipe.encode_prompt(["a dog"]), pipe.encode_prompt([""]))
    plan = pipe.blend_plan(pipe_config())
    plan.latent_blend = s
    return pfb_sampling_loop(pipe.feature_unet, inv.latents[-1].clone(), inv.latents, cached_source_features(inv.features, 1),
                             grid, mask, prompts, plan, 7.5)


def pipe_config():
    from pfbdiff import get_preset

    return get_preset("object")


def test_empty_mask_stays_much_closer_to_the_source_than_full_mask(tiny_pipe, photo):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=6)
    keep = _loop_with_constant_mask(tiny_pipe, inv, 0.0)
    regenerate = _loop_with_constant_mask(tiny_pipe, inv, 1.0)
    source = inv.latents[0]
    assert (keep - source).norm() < 0.5 * (regenerate - source).norm()


def test_final_step_lock_keeps_the_clean_source_latent_outside_the_mask(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=4)
    out = tiny_pipe.edit(inv, box_mask, "a dog", latent_blend=-1.0, output_type="latent").images
    keep = tiny_pipe.prepare_masks(inv, box_mask, preset=pipe_config()).edit.latent == 0
    assert keep.any() and torch.equal(out[keep.expand_as(out)], inv.latents[0][keep.expand_as(out)])


def test_a_latent_inset_gives_the_edit_region_a_latent_core_the_union_of_its_words_cores(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=2)
    plain = tiny_pipe.prepare_masks(inv, box_mask, preset=pipe_config(), latent_inset=0.0)
    inset = tiny_pipe.prepare_masks(inv, box_mask, preset=pipe_config(), latent_inset=0.2)
    assert plain.edit.latent_core is None and torch.equal(inset.edit.latent, plain.edit.latent)
    assert torch.all(inset.edit.latent_core.latent <= inset.edit.latent)
    assert inset.edit.latent_core.latent.sum() < 0.7 * inset.edit.latent.sum()
    left, right = np.zeros_like(box_mask), np.zeros_like(box_mask)
    left[20:70, 10:55], right[20:70, 70:120] = 1, 1
    words = tiny_pipe.prepare_masks(inv, None, "a cat and a dog", preset="multi-object", latent_inset=0.2,
                                    word_masks={"cat": left, "dog": right})
    cores = [m.latent_core.latent for m in words.words.values()]
    assert torch.equal(words.edit.latent_core.latent, torch.maximum(*cores))


@pytest.mark.parametrize("layout_until", [1000, 0])
def test_once_the_layout_is_settled_the_latent_blend_keeps_the_band_outside_the_latent_core_as_the_source(
        tiny_pipe, photo, box_mask, layout_until):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=4)

    def edit(inset):
        return tiny_pipe.edit(inv, box_mask, "a dog", latent_blend=-1.0, latent_inset=inset, word_boost=0.0,
                              word_boost_until=layout_until, output_type="latent",
                              generator=torch.Generator().manual_seed(0)).images

    masks = tiny_pipe.prepare_masks(inv, box_mask, preset=pipe_config(), latent_inset=0.3)
    band = ((masks.edit.latent > 0) & (masks.edit.latent_core.latent == 0)).expand_as(inv.latents[0])
    inset, whole = edit(0.3), edit(0.0)
    assert band.any() and not torch.equal(whole[band], inv.latents[0][band])
    if layout_until == 1000:  # settled from the first step: the band ends as the clean source latent
        assert torch.equal(inset[band], inv.latents[0][band])
    else:  # never settled: the latent core is never used
        assert torch.equal(inset, whole)


def test_gate_counts_on_the_50_step_sd_grid():
    grid = DDIMGrid.from_scheduler_config(sd_scheduler_config(), 50)
    assert sum(t > 0 for t in grid.timesteps) == 50
    assert sum(t > 200 for t in grid.timesteps) == 40
    latent_steps = {s: [grid.timesteps[n] for n in range(50) if latent_blend_is_open(n, 50, s)] for s in (0.5, 0.8, 0.4, -1)}
    assert len(latent_steps[0.5]) == 24 and min(latent_steps[0.5]) == 521
    assert len(latent_steps[0.8]) == 9 and min(latent_steps[0.8]) == 821
    assert len(latent_steps[0.4]) == 29 and len(latent_steps[-1]) == 50


def test_latent_gate_indexes_the_full_grid_even_with_strength_below_one():
    assert [n for n in range(40) if latent_blend_is_open(n, 50, 0.5)] == list(range(26, 40))


def test_noised_reference_is_the_clean_latent_forward_noised_to_the_level_each_step_lands_on():
    grid = DDIMGrid.from_scheduler_config(sd_scheduler_config(), 10)
    clean = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    draws = iter(torch.randn(3, 1, 4, 6, 6, generator=torch.Generator().manual_seed(2)))
    reference = noised_reference(clean, grid, lambda: next(draws))
    expected_noise = torch.randn(3, 1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    for draw, n in enumerate((9, 8, 0)):  # a fresh draw at every step
        a = grid.alpha_prev(n)
        assert torch.equal(reference(n), a**0.5 * clean + (1 - a) ** 0.5 * expected_noise[draw])


def test_noised_reference_keeps_the_seeded_forward_noised_source_outside_the_mask(tiny_pipe, photo, box_mask):
    steps = 4
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=steps)
    out = tiny_pipe.edit(inv, box_mask, "a dog", latent_blend=-1.0, latent_reference="noised", output_type="latent",
                         start="inverted", generator=torch.Generator().manual_seed(7)).images
    # The edit starts from the inverted latent (no draw), then draws one reference noise per step, last at n = 0.
    noises = torch.randn(steps, *inv.latents[0].shape, generator=torch.Generator().manual_seed(7))
    a = inv.grid.alpha_prev(0)
    last_reference = a**0.5 * inv.latents[0] + (1 - a) ** 0.5 * noises[-1]
    keep = (tiny_pipe.prepare_masks(inv, box_mask, preset=pipe_config()).edit.latent == 0).expand_as(out)
    assert keep.any() and torch.equal(out[keep], last_reference[keep])
    assert not torch.equal(out[keep], inv.latents[0][keep])


def test_latent_reference_must_be_inverted_or_noised():
    from pfbdiff.errors import PFBDiffError

    with pytest.raises(PFBDiffError, match="latent_reference must be 'inverted' or 'noised'"):
        pipe_config().replace(latent_reference="fresh")
