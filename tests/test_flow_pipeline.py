"""PFB-Diff end to end on flow transformers (docs/method.md §13–16): ``PFBDiffSD3Pipeline`` and
``PFBDiffFluxPipeline`` on tiny random-weight models built in code, loaded as users load them."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from helpers import assert_user_error, within_outgrowth
from PIL import Image

from pfbdiff.engine.conditioning import Conditioning
from pfbdiff.errors import PFBDiffError
from pfbdiff.flow_pipeline import PFBDiffFluxPipeline, PFBDiffSD3Pipeline
from pfbdiff.models.toy_flow_models import tiny_flow_components
from pfbdiff.pipeline import load_pipeline

FAMILIES = {"sd3": (PFBDiffSD3Pipeline, StableDiffusion3Pipeline), "flux": (PFBDiffFluxPipeline, FluxPipeline)}
SIDE = 128  # the tiny models' latents are 16 × 16: an 8 × 8 token grid
SOURCE, TARGET = "a cat on a bench", "a red dog on a bench"
#: Edit-free settings: nothing blended, no word masked, the latent blend never open.
NOTHING = dict(blend_depth=0.0, attention_masking=False, latent_blend=1.0)


def _photo(size=(SIDE, SIDE), seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _mask(size=(SIDE, SIDE), box=(32, 48, 96, 112)):
    """A box on whole tokens (16 px = 2 latent pixels = one token) unless ``box`` says otherwise."""
    mask = np.zeros((size[1], size[0]), np.float32)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 1.0
    return mask


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pipe(request):
    pipeline = FAMILIES[request.param][0](**tiny_flow_components(request.param))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_an_edit_leaves_every_pixel_outside_its_region_bit_exact_and_changes_the_inside(pipe):
    """Outside the region the output reports (the mask, and a new object followed past its edge) the photo's own
    pixels; that region never reaches past the preset's outgrowth."""
    photo, mask = _photo(), _mask()
    out = pipe(photo, mask, TARGET, SOURCE, num_inference_steps=3)
    edited, region = np.asarray(out.images[0]), np.asarray(out.masks[0]) > 0
    before = np.asarray(photo)
    assert np.array_equal(edited[~region], before[~region]) and not (region & ~within_outgrowth(mask)).any()
    assert np.abs(edited[mask == 1].astype(int) - before[mask == 1]).mean() > 5


def test_a_large_photo_is_edited_as_a_crop_around_the_mask_and_pasted_back_exactly(pipe):
    size = (400, 300)
    photo, mask = _photo(size, seed=1), _mask(size, box=(250, 100, 330, 180))
    out = pipe(photo, mask, TARGET, SOURCE, num_inference_steps=2, crop=True)
    edited = np.asarray(out.images[0])
    assert edited.shape == (300, 400, 3)
    assert np.array_equal(edited[mask == 0], np.asarray(photo)[mask == 0])
    left, top, right, bottom = out.crop_box
    assert left <= 250 and top <= 100 and right >= 330 and bottom >= 180 and (right - left) < 400


def test_an_edit_that_blends_nothing_is_plain_flow_sampling_from_the_inverted_latent_bit_for_bit(pipe):
    inversion = pipe.invert(_photo(), SOURCE, 3)
    edit = pipe.edit(inversion, _mask(), TARGET, output_type="latent", guidance_scale=4.0, **NOTHING)
    plain = pipe.text_to_image(TARGET, height=SIDE, width=SIDE, num_inference_steps=3, guidance_scale=4.0,
                               latents=inversion.latents[-1], output_type="latent")
    assert torch.equal(edit.latents, plain.latents)


def test_a_noise_in_mask_start_is_seeded_noise_inside_the_mask_and_the_inverted_latent_outside(pipe):
    inversion = pipe.invert(_photo(), SOURCE, 3)
    edit = pipe.edit(inversion, _mask(), TARGET, output_type="latent", guidance_scale=4.0, start="noise-in-mask",
                     generator=torch.Generator().manual_seed(5), **NOTHING)
    noise = torch.randn(inversion.latents[-1].shape, generator=torch.Generator().manual_seed(5))
    inside = torch.from_numpy(_mask()[::8, ::8] == 1).expand_as(noise)
    start = torch.where(inside, noise, inversion.latents[-1])
    plain = pipe.text_to_image(TARGET, height=SIDE, width=SIDE, num_inference_steps=3, guidance_scale=4.0,
                               latents=start, output_type="latent")
    assert torch.equal(edit.latents, plain.latents)


def test_text_to_image_follows_diffusers_own_pipeline_of_the_family(pipe):
    """The velocity wiring (timesteps, packing, ids, pooled vector, guidance) is diffusers': the same start noise
    gives the same latent as diffusers' own pipeline of the family, to float rounding."""
    family_pipeline = FAMILIES["flux" if isinstance(pipe, PFBDiffFluxPipeline) else "sd3"][1](**pipe.components)
    family_pipeline.set_progress_bar_config(disable=True)
    noise = torch.randn(1, pipe.latent_channels, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = pipe.text_to_image(TARGET, height=SIDE, width=SIDE, num_inference_steps=3, guidance_scale=4.0,
                              latents=noise, output_type="latent").latents
    if isinstance(pipe, PFBDiffFluxPipeline):
        packed = pipe._pack_latents(noise, 1, pipe.latent_channels, 16, 16)
        theirs = family_pipeline(TARGET, height=SIDE, width=SIDE, num_inference_steps=3, guidance_scale=4.0,
                                 latents=packed, output_type="latent", max_sequence_length=32).images
        theirs = pipe._unpack_latents(theirs, SIDE, SIDE, pipe.vae_scale_factor)
    else:
        theirs = family_pipeline(TARGET, height=SIDE, width=SIDE, num_inference_steps=3, guidance_scale=4.0,
                                 latents=noise, output_type="latent", max_sequence_length=32).images
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())


def test_with_every_block_blended_the_source_pooled_vector_and_the_latent_blend_open_the_outside_is_the_sources(pipe):
    inversion = pipe.invert(_photo(), SOURCE, 3)
    mask = _mask()
    edit = pipe.edit(inversion, mask, TARGET, output_type="latent", blend_depth=1.0, pooled_from="source",
                     latent_blend=-1.0, attention_masking=False)
    outside = torch.from_numpy(mask[::8, ::8] == 0).expand_as(edit.latents[0])[None]
    clean = inversion.latents[0]
    assert torch.equal(edit.latents[outside], clean[outside])
    assert not torch.equal(edit.latents[~outside], clean[~outside])


def test_a_background_edit_on_a_flow_keeps_the_subjects_latent_cells_the_photos_at_every_step(pipe):
    """The flow family's background preset blends the latent at every step (presets.FAMILY_PRESETS): the latent
    cells wholly outside the (background) mask end as the photo's clean latent exactly, where the U-Net preset
    lets them go after the first fifth of the steps."""
    inversion = pipe.invert(_photo(), SOURCE, 3)
    subject = _mask(box=(48, 48, 96, 96))
    background = 1.0 - subject
    edit = pipe.edit(inversion, background, TARGET, preset="background", output_type="latent", halo=0)
    kept = torch.from_numpy(background[::8, ::8] == 0).expand_as(edit.latents[0])[None]
    clean = inversion.latents[0]
    assert torch.equal(edit.latents[kept], clean[kept])
    assert not torch.equal(edit.latents[~kept], clean[~kept])


def test_a_request_runs_its_preset_as_the_pipelines_family_does(pipe, tmp_path, monkeypatch):
    """The CLI, batch and UI all go through ``run_request``: it resolves the preset for the loaded family."""
    from pfbdiff.apps.request import EditRequest, run_request
    from pfbdiff.engine.presets import get_preset

    _photo().save(tmp_path / "photo.png")
    Image.fromarray((255 - _mask() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    request = EditRequest.checked(image=str(tmp_path / "photo.png"), mask=str(tmp_path / "mask.png"), prompt=TARGET,
                                  source_prompt=SOURCE, preset="background", steps=2, guidance_scale=4.0,
                                  settings={"halo": 0})
    seen, edit = [], pipe.edit
    monkeypatch.setattr(pipe, "edit", lambda *args, preset, **kwargs: seen.append(preset) or edit(*args, preset=preset,
                                                                                                   **kwargs))
    run_request(request, pipe)
    assert seen == [get_preset("background", "flow", halo=0)] and seen[0].latent_blend != request.edit_config.latent_blend


def test_a_shorter_edit_inverts_only_its_share_of_the_steps(pipe):
    inversion = pipe.invert(_photo(), SOURCE, 4, strength=0.5)
    assert inversion.inverted_steps == 2 and inversion.grid.num_steps == 4
    with pytest.raises(PFBDiffError, match="needs 4 inverted steps"):
        pipe.edit(inversion, _mask(), TARGET, strength=1.0)
    assert pipe.edit(inversion, _mask(), TARGET, strength=0.5).images[0].size == (SIDE, SIDE)


@pytest.mark.parametrize("settings", [dict(flow_solver="fireflow"), dict(start="noise"), dict(start="noise-in-mask"),
                                      dict(latent_reference="noised"), dict(text_queries=True),
                                      dict(preset="background"), dict(preset="background", kept_apart=True),
                                      dict(batch_cfg=False), dict(word_boost=4.0)])
def test_every_flow_option_keeps_the_photo_outside_the_edit_region(pipe, settings):
    """Outside the region the paste-back reports (the user's mask, or the background preset's halo-snapped one)
    every pixel is the photo's own."""
    photo, mask = _photo(seed=2), _mask()
    out = pipe(photo, mask, TARGET, SOURCE, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               **settings)
    kept = np.asarray(out.masks[0]) == 0
    assert kept.sum() > 0.5 * (mask == 0).sum()
    assert np.array_equal(np.asarray(out.images[0])[kept], np.asarray(photo)[kept])


def test_the_attribute_presets_inner_halo_keeps_the_old_background_in_the_mask_exactly_and_the_latents_as_they_were(pipe):
    """A red square on plain blue inside a coarse box: the blue band between them is the photo's own, bit for bit,
    outside the region the output reports; only the paste-back differs from an edit without the inner halo."""
    photo = np.zeros((SIDE, SIDE, 3), np.uint8)
    photo[...] = (40, 60, 200)
    photo[64:96, 56:72] = (210, 40, 30)
    mask = _mask()
    inversion = pipe.invert(Image.fromarray(photo), SOURCE, 2, strength=0.8)
    out = {share: pipe.edit(inversion, mask, TARGET, preset="attribute", inner_halo=share,
                            generator=torch.Generator().manual_seed(0)) for share in (0.0, 0.25)}
    band = (mask == 1) & (np.asarray(out[0.25].masks[0]) == 0)
    assert band.sum() > 0.5 * ((mask == 1).sum() - 32 * 16)  # most of the blue inside the box
    assert np.array_equal(np.asarray(out[0.25].images[0])[band], photo[band])
    assert not np.array_equal(np.asarray(out[0.0].images[0])[band], photo[band])
    assert torch.equal(out[0.25].latents, out[0.0].latents)


def test_the_background_presets_negative_prompt_names_the_kept_subject_where_the_model_has_unconditional_rows(pipe):
    """SD3's guidance has unconditional rows, which read the kept subject's words; guidance-distilled Flux has none,
    so the setting changes nothing there."""
    inversion = pipe.invert(_photo(), SOURCE, 2)
    kwargs = dict(prompt="a cat on the grass", preset="background", output_type="latent", guidance_scale=4.0)
    named = pipe.edit(inversion, 1 - _mask(), **kwargs).latents
    by_hand = pipe.edit(inversion, 1 - _mask(), negative_prompt="cat", kept_words_negative=False, **kwargs).latents
    without = pipe.edit(inversion, 1 - _mask(), kept_words_negative=False, **kwargs).latents
    assert torch.equal(named, by_hand)
    assert torch.equal(named, without) == pipe.distilled_guidance


def test_a_share_of_a_subject_free_background_prompt_is_refused_on_a_joint_attention(pipe):
    inversion = pipe.invert(_photo(), SOURCE, 2)
    with pytest.raises(PFBDiffError, match="background_prompt_share is a U-Net setting"):
        pipe.edit(inversion, 1 - _mask(), prompt="a cat on the grass", preset="background",
                  background_prompt_share=0.25)


def test_a_word_is_found_in_every_text_part_the_model_reads(pipe):
    positions = pipe._word_positions("a red dog", ["dog"])
    if isinstance(pipe, PFBDiffSD3Pipeline):  # CLIP's 77 tokens (start token first), then T5's (no start token)
        assert positions == (3, 77 + 2)
    else:  # Flux's text sequence is T5's alone
        assert positions == (2,)
    with pytest.raises(PFBDiffError) as error:
        pipe.check_words("a red dog", pipe_config(inside=("zebra",)))
    assert_user_error(error, "zebra")


def pipe_config(**settings):
    from pfbdiff.engine.presets import get_preset

    return get_preset("object", **settings)


def test_regional_prompts_change_a_multi_object_edit_only_inside_the_regions_before_paste_back(pipe):
    inversion = pipe.invert(_photo(), SOURCE, 2)
    left = _mask(box=(16, 32, 64, 96))
    kwargs = dict(prompt="a red dog and a cat on a bench", preset="multi-object", word_masks={"dog": left, "cat": _mask()},
                  output_type="latent", latent_blend=-1.0)  # the latent blend every step: outside is the source's
    plain = pipe.edit(inversion, **kwargs).latents
    regional = pipe.edit(inversion, region_prompts={"dog": "a red dog"}, **kwargs).latents
    words = pipe.edit(inversion, own_region_prompts=True, **kwargs).latents
    outside = torch.from_numpy((left == 0) & (_mask() == 0))[::8, ::8].expand_as(plain)
    assert torch.equal(regional[outside], plain[outside]) and torch.equal(words[outside], plain[outside])
    assert not torch.equal(regional, plain) and not torch.equal(words, regional)  # a word alone is another prompt
    with pytest.raises(PFBDiffError) as error:
        pipe.edit(inversion, region_prompts={"zebra": "a zebra"}, **kwargs)
    assert_user_error(error, "region_prompts")


def test_the_auto_mask_comes_from_the_two_prompts_velocities_and_bounds_the_edit(pipe):
    """Where the two prompts agree the velocities agree exactly, so the same prompt twice finds nothing; with
    another prompt the estimated region is edited and every pixel outside it is the photo's."""
    from pfbdiff.engine import automask

    inversion = pipe.invert(_photo(seed=3), SOURCE, 2)
    same = Conditioning.cat([inversion.source_embeddings] * 2)
    nothing = automask.flow_difference_map(pipe._velocity(same, 1.0), inversion.latents[0], draws=2)
    assert not nothing.any()
    out = pipe.edit(inversion, None, TARGET, auto_mask=True, auto_mask_threshold=0.3)
    estimated = np.asarray(out.auto_masks[0]) > 0
    assert 0 < estimated.mean() < 1
    kept = np.asarray(out.masks[0]) == 0
    assert kept.any() and np.array_equal(np.asarray(out.images[0])[kept], np.asarray(_photo(seed=3))[kept])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_saved_model_folder_loads_as_its_family_with_the_familys_settings(tmp_path, family):
    ours, theirs = FAMILIES[family]
    theirs(**tiny_flow_components(family)).save_pretrained(tmp_path, safe_serialization=True)
    pipeline = load_pipeline(tmp_path, quiet=True)
    assert type(pipeline) is ours
    assert pipeline.recommended_settings == ours.default_settings
    (tmp_path / "pfbdiff.json").write_text('{"num_inference_steps": 12, "guidance_scale": 2.5}')
    assert load_pipeline(tmp_path, quiet=True).recommended_settings == {"num_inference_steps": 12,
                                                                        "guidance_scale": 2.5}


def test_a_flow_folder_without_transformer_weights_is_named_in_one_line(tmp_path):
    StableDiffusion3Pipeline(**tiny_flow_components("sd3")).save_pretrained(tmp_path, safe_serialization=True)
    for weights in (tmp_path / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(PFBDiffError) as error:
        load_pipeline(tmp_path, quiet=True)
    assert_user_error(error, "transformer", "has no weights")


def test_the_cli_edits_with_a_flow_model_folder_and_keeps_the_photo_outside_the_mask(tmp_path):
    from typer.testing import CliRunner

    from pfbdiff.apps.cli import app

    FluxPipeline(**tiny_flow_components("flux")).save_pretrained(tmp_path / "flux", safe_serialization=True)
    size = (200, 150)
    photo, mask = _photo(size, seed=4), _mask(size, box=(60, 40, 140, 120))
    photo.save(tmp_path / "photo.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    result = CliRunner().invoke(app, ["edit", str(tmp_path / "photo.png"), "-m", str(tmp_path / "mask.png"),
                                      "-p", TARGET, "--source-prompt", SOURCE, "--model", str(tmp_path / "flux"),
                                      "--steps", "2", "-o", str(tmp_path / "out.png")])
    assert result.exit_code == 0, result.output
    edited = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    kept = ~within_outgrowth(mask)
    assert np.array_equal(edited[kept], np.asarray(photo)[kept])


def test_an_euler_inversion_records_the_source_tokens_the_edit_would_compute(pipe):
    """The tokens an Euler inversion records at (Z[k], σ[k]) are those of the source branch there, bit for bit; an
    edit that takes them gives what an edit computing its source rows in its own batch gives."""
    from pfbdiff.engine.inversion import FeatureRecorder

    inversion = pipe.invert(_photo(), SOURCE, 3)
    window = pipe.feature_transformer.window(0.5)
    assert inversion.recorded_blocks == frozenset(window) and len(inversion.features) == 3
    for k in range(3):
        recorder = FeatureRecorder(window)
        pipe._velocity(inversion.source_embeddings, 1.0)(inversion.latents[k], inversion.grid.sigmas[k], recorder)
        assert all(torch.equal(recorder.features[b], inversion.features[k][b]) for b in window)
    cached = pipe.edit(inversion, _mask(), TARGET, output_type="latent").latents
    in_batch = pipe.edit(inversion, _mask(), TARGET, output_type="latent", cache_source=False).latents
    separate = pipe.edit(inversion, _mask(), TARGET, output_type="latent", cache_source=False, batch_cfg=False).latents
    assert torch.allclose(cached, in_batch, atol=1e-5) and torch.allclose(cached, separate, atol=1e-5)
    assert not pipe.invert(_photo(), SOURCE, 3, solver="midpoint").recorded_blocks  # midpoints are off the grid


def test_the_web_ui_edits_with_a_flow_model_and_reuses_its_inversion(pipe, tmp_path):
    from pfbdiff.apps import ui

    photo, mask = np.asarray(_photo(seed=5)), _mask()
    session = ui.EditSession(pipe, "tiny-flow", output_dir=tmp_path)
    first = session.run(photo, mask, TARGET, source_prompt=SOURCE, steps=2)
    second = session.run(photo, mask, "a blue dog on a bench", source_prompt=SOURCE, steps=2)
    assert not first.reused_inversion and second.reused_inversion and second.unet_calls < first.unet_calls
    kept = ~within_outgrowth(mask)
    assert np.array_equal(np.asarray(second.image)[kept], photo[kept])


def test_a_single_file_transformer_loads_with_the_other_components_from_its_familys_folder(tmp_path):
    from safetensors.torch import save_file

    FluxPipeline(**tiny_flow_components("flux")).save_pretrained(tmp_path / "flux", safe_serialization=True)
    tuned = tiny_flow_components("flux", seed=7)["transformer"]  # other weights, as a fine-tune's file has
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(tmp_path / "flux-tuned.safetensors"))
    pipeline = load_pipeline(tmp_path / "flux-tuned.safetensors", config=str(tmp_path / "flux"), quiet=True)
    assert type(pipeline) is PFBDiffFluxPipeline
    loaded = pipeline.transformer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tuned.state_dict().items())
    with pytest.raises(PFBDiffError) as error:
        load_pipeline(tmp_path / "flux-tuned.safetensors", quiet=True)
    assert_user_error(error, "single-file Flux transformer", "--config")


def test_a_transformer_lora_loads_through_load_pipeline_and_changes_the_edit(tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict

    FluxPipeline(**tiny_flow_components("flux")).save_pretrained(tmp_path / "flux", safe_serialization=True)
    transformer = tiny_flow_components("flux")["transformer"]
    torch.manual_seed(1)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                       init_lora_weights=False))
    FluxPipeline.save_lora_weights(str(tmp_path / "lora"), transformer_lora_layers=get_peft_model_state_dict(
        transformer), safe_serialization=True)
    lora = {"path": str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "scale": 1.0}
    plain, styled = (load_pipeline(tmp_path / "flux", quiet=True, loras=loras) for loras in ((), [lora]))
    photo, mask = _photo(seed=6), _mask()
    outputs = [p(photo, mask, TARGET, SOURCE, num_inference_steps=2).images[0] for p in (plain, styled)]
    assert not np.array_equal(np.asarray(outputs[0]), np.asarray(outputs[1]))
    assert np.array_equal(np.asarray(outputs[1])[mask == 0], np.asarray(photo)[mask == 0])
    with pytest.raises(PFBDiffError) as error:
        load_pipeline(tmp_path / "flux", quiet=True, embeddings=[{"path": lora["path"], "token": "<x>"}])
    assert_user_error(error, "embeddings are not supported on SD3 and Flux")


def test_the_bundled_sd3_layout_model_is_named_with_how_to_make_it_where_it_is_missing(monkeypatch, tmp_path):
    from pfbdiff.models import catalog

    monkeypatch.setattr(catalog, "BUNDLED_SHAPES_SD3_MODEL", tmp_path / "absent")
    with pytest.raises(PFBDiffError) as error:
        load_pipeline("shapes-sd3", quiet=True)
    assert_user_error(error, "'shapes-sd3' model is not in this install", "--family sd3")
