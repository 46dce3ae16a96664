"""The diffusers-shaped face: from_pretrained, invert / edit / __call__, outputs, batches, callbacks."""

import numpy as np
import pytest
import torch
from PIL import Image

from pfbdiff import PFBDiffError, PFBDiffPipeline, load_pipeline
from pfbdiff.models.toy_models import tiny_sd_components


def test_from_pretrained_folder_and_load_pipeline(tiny_model_dir):
    pipe = PFBDiffPipeline.from_pretrained(tiny_model_dir, device="cpu")
    assert isinstance(load_pipeline(str(tiny_model_dir)), PFBDiffPipeline)
    assert pipe.feature_unet.middle_index == 13


def test_call_returns_images_of_the_input_size_for_non_square_inputs(tiny_pipe):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (75, 133, 3), dtype=np.uint8))
    mask = np.zeros((75, 133), np.float32)
    mask[10:50, 20:100] = 1
    out = tiny_pipe(image, mask, "a dog", "a cat", num_inference_steps=2)
    assert out.images[0].size == (133, 75) and out.images[0].mode == "RGB"


@pytest.mark.parametrize("output_type, kind", [("pil", list), ("np", np.ndarray), ("pt", torch.Tensor), ("latent", torch.Tensor)])
def test_output_types(tiny_pipe, photo, box_mask, output_type, kind):
    out = tiny_pipe(photo, box_mask, "a dog", num_inference_steps=2, output_type=output_type)
    assert isinstance(out.images, kind)
    if output_type == "np":
        assert out.images.shape == (1, 96, 128, 3) and 0 <= out.images.min() and out.images.max() <= 1
    if output_type == "pt":
        assert out.images.shape == (1, 3, 96, 128)


def test_seeded_noise_start_batches_are_reproducible_and_diverse(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=3)
    run = lambda seed: tiny_pipe.edit(inv, box_mask, "a dog", start="noise", num_images_per_prompt=2,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed), output_type="latent").images
    first, again, other = run(1), run(1), run(2)
    assert first.shape[0] == 2 and torch.equal(first, again)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first, other)


def test_a_batch_of_images_is_inverted_and_edited_together(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert([photo, 255 - photo], ["a cat", "a dog"], num_inference_steps=2)
    assert inv.batch_size == 2
    out = tiny_pipe.edit(inv, box_mask, ["a dog", "a cat"], output_type="np").images
    assert out.shape[0] == 2 and not np.array_equal(out[0], out[1])


def test_callback_sees_every_step_and_can_replace_latents(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=3)
    steps = []

    def callback(pipe, i, t, state):
        steps.append((i, t))
        return {"latents": torch.zeros_like(state["latents"])}

    out = tiny_pipe.edit(inv, box_mask, "a dog", callback_on_step_end=callback, output_type="latent").images
    assert [i for i, _ in steps] == [0, 1, 2] and [t for _, t in steps] == sorted((t for _, t in steps), reverse=True)
    assert torch.equal(out, torch.zeros_like(out))


def test_negative_prompt_and_guidance_change_the_result(tiny_pipe, photo, box_mask):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=2)
    base = tiny_pipe.edit(inv, box_mask, "a dog", output_type="latent").images
    negative = tiny_pipe.edit(inv, box_mask, "a dog", negative_prompt="blurry", output_type="latent").images
    no_cfg = tiny_pipe.edit(inv, box_mask, "a dog", guidance_scale=1.0, output_type="latent").images
    assert not torch.equal(base, negative) and not torch.equal(base, no_cfg)


def test_all_black_mask_is_an_error_and_no_mask_at_all_too(tiny_pipe, photo):
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=1)
    with pytest.raises(PFBDiffError, match="all black"):
        tiny_pipe.edit(inv, np.zeros((96, 128), np.float32), "a dog")
    with pytest.raises(PFBDiffError, match="no mask"):
        tiny_pipe.edit(inv, None, "a dog")


def test_misspelt_word_is_reported_before_inverting(tiny_pipe, photo, box_mask):
    calls = tiny_pipe.unet_calls
    with pytest.raises(PFBDiffError, match="'dgo' does not occur"):
        tiny_pipe(photo, box_mask, "a dog", inside=["dgo"], num_inference_steps=2)
    assert tiny_pipe.unet_calls == calls


def test_v_prediction_with_zero_terminal_snr_edits_end_to_end(photo, box_mask):
    components = tiny_sd_components(seed=1, prediction_type="v_prediction")
    components["scheduler"] = components["scheduler"].__class__.from_config(
        components["scheduler"].config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe = PFBDiffPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    inv = pipe.invert(photo, "a cat", num_inference_steps=4)
    assert inv.grid.timesteps[-1] == 999
    out = pipe.edit(inv, box_mask, "a dog", output_type="latent").images
    assert torch.isfinite(out).all() and all(torch.isfinite(z).all() for z in inv.latents)


def test_a_soft_mask_gives_fractional_latent_blend_weights(tiny_pipe, photo):
    soft = np.full((96, 128), 0.5, np.float32)
    inv = tiny_pipe.invert(photo, "a cat", num_inference_steps=2)
    mask = tiny_pipe.prepare_masks(inv, soft).edit
    assert torch.allclose(mask.latent, torch.full_like(mask.latent, 0.5))


def test_model_cpu_offload_is_refused_rather_than_silently_bypassed(tiny_pipe):
    # the feature walker runs the U-Net's blocks itself, so accelerate's hook on unet.forward would never fire
    with pytest.raises(PFBDiffError, match="offload is not supported"):
        tiny_pipe.enable_model_cpu_offload()


def test_unknown_from_pretrained_arguments_are_refused(tiny_model_dir):
    with pytest.raises(PFBDiffError, match="safety_checker"):
        PFBDiffPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
