"""SDXL: the same mechanisms on its U-Net (three levels, no cross-attention at the top one), with its conditioning
(two text encoders side by side, the pooled vector and the size ids, zeros for an empty negative prompt), loaded
from a diffusers folder through the real loading code; the exact properties of the SD 1.x suite hold."""

import json

import numpy as np
import pytest
import torch
from helpers import assert_confined_to
from PIL import Image
from typer.testing import CliRunner

from pfbdiff import get_preset
from pfbdiff.apps.cli import app
from pfbdiff.engine.loop import Prompts, plain_sampling_loop, recomputed_source_features
from pfbdiff.engine.tokens import positions_of
from pfbdiff.models.toy_models import save_tiny_model
from pfbdiff.pipeline import load_pipeline

NO_OP = dict(blend_blocks=(), attention_masking=False, latent_blend=0.98)


@pytest.fixture(scope="module")
def sdxl_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-sdxl") / "model", seed=2, family="sdxl")


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_model_dir):
    return load_pipeline(str(sdxl_model_dir), quiet=True, device="cpu", torch_dtype="float32")


def test_the_walker_numbers_sdxl_blocks_by_level(sdxl_pipe):
    unet = sdxl_pipe.feature_unet
    assert unet.num_levels == 3 and sdxl_pipe.text_encoder_2 is not None
    assert {b.attention_level for b in unet.blocks if b.attention_level is not None} == {1, 2}  # none at the top
    assert unet.attention_blocks_at_levels((0, 1, 2, 3))  # the presets' four levels carry over
    with pytest.warns(UserWarning, match="the paper-\\* presets reproduce the official SD 1.x code only"):
        sdxl_pipe.blend_plan(get_preset("paper-object"))  # its numbers exist here, but name other blocks


def test_the_conditioning_is_both_encoders_the_pooled_vector_and_the_size(sdxl_pipe):
    encoded = sdxl_pipe.encode_prompt(["a dog", ""], (96, 128))
    first, second = sdxl_pipe.text_encoder.config.hidden_size, sdxl_pipe.text_encoder_2.config.hidden_size
    assert encoded.tokens.shape == (2, 77, first + second) and encoded.pooled.shape == (2, second)
    assert encoded.time_ids.tolist() == [[96, 128, 0, 0, 96, 128]] * 2
    negative = sdxl_pipe.encode_prompt(["", "blurry"], (96, 128), negative=True)
    assert torch.all(negative.tokens[0] == 0) and torch.all(negative.pooled[0] == 0)  # force_zeros_for_empty_prompt
    assert negative.tokens[1].abs().sum() > 0 and torch.equal(encoded.tokens[1], sdxl_pipe.encode_prompt([""]).tokens[0])


def test_no_op_config_is_exactly_plain_sampling_from_the_inverted_latent(sdxl_pipe, photo, box_mask):
    inv = sdxl_pipe.invert(photo, "a cat", num_inference_steps=4)
    edited = sdxl_pipe.edit(inv, box_mask, "a dog", output_type="latent", **NO_OP).images
    size = tuple(inv.image.shape[-2:])
    prompts = Prompts(None, sdxl_pipe.encode_prompt(["a dog"], size), sdxl_pipe.encode_prompt([""], size, negative=True))
    plain = plain_sampling_loop(sdxl_pipe.feature_unet, inv.latents[-1], sdxl_pipe.ddim_grid(4), prompts, 7.5)
    assert torch.equal(edited, plain)


def test_recorded_source_features_equal_recomputed_ones(sdxl_pipe, photo):
    inv = sdxl_pipe.invert(photo, "a cat", num_inference_steps=3)
    assert inv.recorded_blocks
    recompute = recomputed_source_features(sdxl_pipe.feature_unet, inv.latents, inv.source_embeddings,
                                           inv.recorded_blocks)
    for n, t in enumerate(inv.grid.timesteps):
        assert all(torch.equal(recompute(n, t)[k], inv.features[n][k]) for k in inv.recorded_blocks)


@pytest.mark.parametrize("preset, prompt, source, words", [
    ("object", "a blue dog", "a red cat", ["blue", "dog"]),
    ("attribute", "a blue dog", "a red cat", ["blue", "dog"]),
    ("background", "a red cat in a desert", "a red cat on grass", ["red", "cat"]),
    ("multi-object", "a blue dog", "a red cat", ["blue dog"]),
])
def test_every_preset_edits_with_its_words_masked_and_the_rest_of_the_photo_kept(sdxl_pipe, photo, box_mask, preset,
                                                                                 prompt, source, words):
    seen = {}
    mask = 1 - box_mask if preset == "background" else box_mask
    regions = dict(word_masks={"blue dog": box_mask}) if preset == "multi-object" else {}
    result = sdxl_pipe(photo, None if regions else mask, prompt, source, preset=preset, num_inference_steps=3,
                       attention_observer=lambda index, p: seen.setdefault(index, p[-1]), **regions)
    image = np.asarray(result.images[0])
    keep = np.asarray(result.masks[0]) == 0
    assert np.array_equal(image[keep], photo[keep])  # paste-back: bit for bit outside the mask
    positions = list(positions_of(sdxl_pipe.tokenizer, prompt, words))
    if preset in ("object", "attribute"):  # the new words: exactly zero outside the edit mask, in every block
        assert_confined_to(seen, result.latent_masks, positions)
    on_words = [p[..., positions] for p in seen.values()]
    assert on_words and all((a == 0).any() for a in on_words) and any((a > 0).any() for a in on_words)


def test_half_precision_keeps_the_vae_in_float32_as_sdxl_asks(sdxl_model_dir, photo, box_mask):
    pipe = load_pipeline(str(sdxl_model_dir), quiet=True, device="cpu", torch_dtype="float16")
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    assert np.isfinite(np.asarray(pipe(photo, box_mask, "a dog", "a cat", num_inference_steps=2).images[0])).all()


def test_the_cli_edits_an_sdxl_folder_and_replays_it(sdxl_model_dir, files):
    folder, image, mask = files
    out = folder / "xl.png"
    runner = CliRunner()
    result = runner.invoke(app, ["edit", str(image), "-m", str(mask), "-p", "a dog", "-s", "a cat", "--steps", "2",
                                 "--model", str(sdxl_model_dir), "-o", str(out), "--save-json"])
    assert result.exit_code == 0, result.output
    assert json.loads((folder / "xl.json").read_text())["model"] == str(sdxl_model_dir)
    assert runner.invoke(app, ["edit", "--from-json", str(out), "-o", str(folder / "again.png")]).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(folder / "again.png")))


def test_an_sdxl_lora_changes_the_edit_and_an_sd1_one_is_one_line(sdxl_model_dir, tmp_path, photo, box_mask):
    from helpers import random_lora

    from pfbdiff.errors import PFBDiffError
    from pfbdiff.models.toy_models import tiny_sd_components

    lora = random_lora(tiny_sd_components(seed=2, family="sdxl"), tmp_path / "xl")
    base = load_pipeline(str(sdxl_model_dir), quiet=True)
    styled = load_pipeline(str(sdxl_model_dir), quiet=True, loras=[{"path": str(lora), "scale": 1.0}])
    assert type(styled).__name__ == "PFBDiffXLPipeline"  # SDXL's LoRA loader
    edits = [np.asarray(pipe(photo, box_mask, "a dog", "a cat", num_inference_steps=2, output_type="np").images)
             for pipe in (base, styled)]
    assert np.abs(edits[1] - edits[0]).max() > 0.05
    sd1_lora = random_lora(tiny_sd_components(seed=0), tmp_path / "sd1")
    with pytest.raises(PFBDiffError, match="cannot apply the LoRA"):
        load_pipeline(str(sdxl_model_dir), quiet=True, loras=[{"path": str(sd1_lora), "scale": 1.0}])
    with pytest.raises(PFBDiffError, match="embeddings on SDXL models are not supported yet"):
        load_pipeline(str(sdxl_model_dir), quiet=True, embeddings=[{"path": str(sd1_lora), "token": None}])
