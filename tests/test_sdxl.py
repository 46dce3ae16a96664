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

NO_OP = dict(blend_blocks=(), attention_masking=False, latent_blend=0.98, start="inverted")


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


@pytest.mark.parametrize("start", ["inverted", "noise-in-mask"])
def test_no_op_config_is_exactly_plain_sampling_from_the_start_latent(sdxl_pipe, photo, box_mask, start):
    """From the inverted latent, or (the object preset's start on SDXL) from seeded noise inside the mask and the
    inverted latent outside it."""
    inv = sdxl_pipe.invert(photo, "a cat", num_inference_steps=4)
    edited = sdxl_pipe.edit(inv, box_mask, "a dog", output_type="latent", generator=torch.Generator().manual_seed(3),
                            **{**NO_OP, "start": start}).images
    x = inv.latents[-1]
    if start == "noise-in-mask":
        inside = sdxl_pipe.prepare_masks(inv, box_mask).edit.latent
        assert set(inside.unique().tolist()) == {0.0, 1.0}  # the box lies on the latent grid: no soft edge to mix
        x = torch.where(inside.bool(), torch.randn(x.shape, generator=torch.Generator().manual_seed(3)), x)
    size = tuple(inv.image.shape[-2:])
    prompts = Prompts(None, sdxl_pipe.encode_prompt(["a dog"], size), sdxl_pipe.encode_prompt([""], size, negative=True))
    plain = plain_sampling_loop(sdxl_pipe.feature_unet, x, sdxl_pipe.ddim_grid(4), prompts, 7.5)
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


def conditionings_seen(pipe, monkeypatch) -> list:
    """Every conditioning record the U-Net walker is called with from now on."""
    seen, walker = [], type(pipe.feature_unet)
    original = walker.__call__

    def recording(self, sample, t, conditioning, *args, **kwargs):
        seen.append(conditioning)
        return original(self, sample, t, conditioning, *args, **kwargs)

    monkeypatch.setattr(walker, "__call__", recording)
    return seen


@pytest.mark.parametrize("pooled_from", ["target", "source"])
def test_pooled_from_chooses_the_prompt_whose_pooled_vector_modulates_the_edit(sdxl_pipe, photo, box_mask,
                                                                               monkeypatch, pooled_from):
    inv = sdxl_pipe.invert(photo, "a red cat", num_inference_steps=2)
    seen = conditionings_seen(sdxl_pipe, monkeypatch)
    sdxl_pipe.edit(inv, box_mask, "a blue dog", pooled_from=pooled_from, output_type="latent")
    expected = (inv.source_embeddings if pooled_from == "source" else sdxl_pipe.encode_prompt(["a blue dog"])).pooled
    unconditional = sdxl_pipe.encode_prompt([""], negative=True).pooled
    assert seen and all(len(c) == 2 for c in seen)  # batched guidance: unconditional row, then the edit's row
    assert all(torch.equal(c.pooled[1:], expected) and torch.equal(c.pooled[:1], unconditional) for c in seen)
    assert not torch.equal(inv.source_embeddings.pooled, sdxl_pipe.encode_prompt(["a blue dog"]).pooled)


@pytest.mark.parametrize("size_ids", ["model", "box"])
def test_every_branch_of_an_edit_runs_with_the_inversions_size_ids(sdxl_pipe, photo, box_mask, monkeypatch, size_ids):
    from pfbdiff.errors import PFBDiffError

    seen = conditionings_seen(sdxl_pipe, monkeypatch)
    result = sdxl_pipe(photo, box_mask, "a dog", "a cat", num_inference_steps=2, crop=True, crop_padding=8,
                       size_ids=size_ids, output_type="latent")
    model_h, model_w = result.latents.shape[-2] * 8, result.latents.shape[-1] * 8
    box = (48 + 2 * 8, 64 + 2 * 8)  # the mask's 48 x 64 box, padded by 8 px on every side
    original = [box[0], box[1]] if size_ids == "box" else [model_h, model_w]
    assert box != (model_h, model_w)
    assert all(c.time_ids.tolist() == [original + [0, 0, model_h, model_w]] * len(c) for c in seen)
    inv = sdxl_pipe.invert(photo, "a cat", num_inference_steps=2, mask_image=box_mask, crop=True, size_ids=size_ids)
    other = "model" if size_ids == "box" else "box"
    with pytest.raises(PFBDiffError, match=f"size_ids is '{other}' but the inversion was made with '{size_ids}'"):
        sdxl_pipe.edit(inv, box_mask, "a dog", size_ids=other)


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



@pytest.mark.parametrize("vectors, pieces", [(1, 1), (3, 3)])
def test_an_sdxl_embedding_goes_into_both_encoders_and_its_token_is_masked_like_any_word(
        sdxl_model_dir, sdxl_pipe, tmp_path, photo, box_mask, vectors, pieces):
    from safetensors.torch import save_file

    widths = [encoder.get_input_embeddings().weight.shape[1]
              for encoder in (sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2)]
    torch.manual_seed(3)
    path = tmp_path / "shiny.safetensors"  # the SDXL trainers' format: a vector set per text encoder
    save_file({"clip_l": torch.randn(vectors, widths[0]) * 5, "clip_g": torch.randn(vectors, widths[1]) * 5}, str(path))
    pipe = load_pipeline(str(sdxl_model_dir), quiet=True, embeddings=[{"path": str(path), "token": None}])
    prompt = pipe.maybe_convert_prompt("a <shiny> dog", pipe.tokenizer)
    positions = list(positions_of(pipe.tokenizer, prompt, [pipe.maybe_convert_prompt("<shiny>", pipe.tokenizer)]))
    assert len(positions) == pieces
    assert [len(tokenizer(prompt).input_ids) for tokenizer in (pipe.tokenizer, pipe.tokenizer_2)] == [3 + pieces + 1] * 2
    plain = sdxl_pipe.encode_prompt(["a dog"]).tokens
    encoded = pipe.encode_prompt(["a <shiny> dog"]).tokens
    for half in (slice(0, widths[0]), slice(widths[0], None)):  # both encoders read the new vectors
        assert not torch.allclose(encoded[0, positions[0], half], plain[0, positions[0], half])
    seen = {}
    result = pipe(photo, box_mask, "a <shiny> dog", "a cat", num_inference_steps=2,
                  attention_observer=lambda index, p: seen.setdefault(index, p[-1]))
    assert_confined_to(seen, result.latent_masks, positions)


def test_an_sd1_embedding_on_sdxl_is_one_line(sdxl_model_dir, tmp_path):
    from safetensors.torch import save_file

    from pfbdiff.errors import PFBDiffError

    path = tmp_path / "old.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(path))
    with pytest.raises(PFBDiffError, match=r"cannot load the embedding .* \(it has no clip_g and clip_l vectors\)"):
        load_pipeline(str(sdxl_model_dir), quiet=True, embeddings=[{"path": str(path), "token": None}])


def _same_weights(loaded: dict, reference) -> bool:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return all(torch.equal(value, getattr(reference, name).state_dict()[key])
               for name in names for key, value in loaded[name].state_dict().items())


def test_a_single_file_sdxl_checkpoint_loads_with_its_config_folder_and_edits_the_same(
        sdxl_model_dir, sdxl_pipe, tiny_model_dir, tmp_path, photo, box_mask):
    from ldm_checkpoint import write_ldm_safetensors

    from pfbdiff.errors import PFBDiffError
    from pfbdiff.models.loading import load_components

    path = write_ldm_safetensors(sdxl_pipe.components, tmp_path / "xl.safetensors", family="sdxl")
    loaded = load_components(path, config=str(sdxl_model_dir), device="cpu")
    assert _same_weights(loaded, sdxl_pipe)  # the SDXL layout (both encoders, label_emb) read back exactly
    pipe = load_pipeline(str(path), config=str(sdxl_model_dir), quiet=True)
    assert type(pipe).__name__ == "PFBDiffXLPipeline" and pipe.config.force_zeros_for_empty_prompt
    edits = [np.asarray(p(photo, box_mask, "a dog", "a cat", num_inference_steps=2, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images) for p in (pipe, sdxl_pipe)]
    # the same weights, though not the same bytes in memory: BLAS kernels may sum in another order (a 2e-6 difference
    # in the U-Net's first layer was measured), so the 8-bit pictures agree to within one level
    assert np.abs(edits[0] - edits[1]).max() <= 1 / 255 + 1e-6
    with pytest.raises(PFBDiffError, match="is an SDXL checkpoint but --config .* is an SD 1.x/2.x model folder"):
        load_components(path, config=str(tiny_model_dir), device="cpu")


def test_sdxl_sizes_are_its_native_1024_and_its_64_pixel_buckets():
    from pfbdiff.models.full_size import random_unet, sdxl_unet_config
    from pfbdiff.photo import regions

    unet = random_unet(sdxl_unet_config(), device="meta")
    native, multiple = regions.native_side(unet, 8), regions.size_multiple(unet, 8)
    assert (native, multiple) == (1024, 64)
    plan = regions.plan_region((3000, 2000), regions.CropBox(1000, 800, 1300, 1000), native=native,
                               multiple=multiple, min_side=regions.min_model_side(3, 8))
    assert plan.box.size == (450, 350)  # the 300 x 200 box and a quarter of its longer side around it
    assert plan.model_size == (1152, 896)  # one of SDXL's training buckets, about 1024² pixels, aspect kept
