"""Honest limits: a model of a family pfbdiff cannot edit yet (SD3 and Flux variants, PixArt, an SDXL refiner,
inpainting U-Nets; an SD3 or Flux transformer file with another family's configs) is named in one line, from a folder, a hub id or a single file, before any weights load; a flow-matching schedule is
never read as a DDPM one; the paper presets' SD 1.x block numbers are refused on another layout."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pfbdiff.apps.cli import app
from pfbdiff.engine.sampling import DDIMGrid
from pfbdiff.errors import PFBDiffError
from pfbdiff.models import hub
from pfbdiff.models.loading import load_components

runner = CliRunner()


def _variant_of(tiny_model_dir, folder, index_changes, unet_changes=None):
    """The tiny model with its model_index.json (and U-Net config) changed to look like another family."""
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **index_changes}))
    if unet_changes:
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, **unet_changes}))
    return folder


FOLDERS = {
    "sdxl refiner": (dict(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None],
                          text_encoder_2=["transformers", "CLIPTextModelWithProjection"]),
                     None, "is an SDXL refiner (it has no first text encoder)"),
    "flux fill": (dict(_class_name="FluxFillPipeline", transformer=["diffusers", "FluxTransformer2DModel"]), None,
                  "is a Flux variant (FluxFillPipeline)"),
    "sd3 controlnet": (dict(_class_name="StableDiffusion3ControlNetPipeline"), None,
                       "is a Stable Diffusion 3 variant"),
    "unknown transformer": (dict(_class_name="SomeNewPipeline", transformer=["diffusers", "X"]), None,
                            "is a SomeNewPipeline model"),
    "inpainting": ({}, dict(in_channels=9), "is an inpainting or depth model (its U-Net takes 9 input channels)"),
}


@pytest.mark.parametrize("family", list(FOLDERS))
def test_a_folder_of_another_family_is_named_in_one_line(tiny_model_dir, tmp_path, family, files):
    index_changes, unet_changes, fragment = FOLDERS[family]
    folder = _variant_of(tiny_model_dir, tmp_path / family, index_changes, unet_changes)
    with pytest.raises(PFBDiffError, match="pfbdiff edits Stable Diffusion 1.x, 2.x, SDXL, SD3 and Flux.1 text-to-image models") as error:
        load_components(str(folder), device="cpu")
    assert fragment in str(error.value) and "\n" not in str(error.value)
    _, image, mask = files
    result = runner.invoke(app, ["edit", str(image), "-m", str(mask), "-p", "a dog", "--model", str(folder),
                                 "-o", str(tmp_path / "out.png")])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.png").exists()


def test_a_cached_hub_id_of_another_family_is_named_without_trying_the_network(monkeypatch, tiny_model_dir, tmp_path):
    folder = _variant_of(tiny_model_dir, tmp_path / "flux", *FOLDERS["flux fill"][:2])

    def cached_only(repo_id, patterns, local_files_only, **where):
        assert local_files_only, "no download can make a Flux Fill model editable"
        return folder

    monkeypatch.setattr(hub, "_snapshot_download", cached_only)
    with pytest.raises(PFBDiffError, match="is a Flux variant"):
        load_components("black-forest-labs/FLUX.1-Fill-dev", device="cpu")


@pytest.mark.parametrize("weights, fragment", [
    ({"conditioner.embedders.0.model.text_projection": torch.zeros(2, 2)}, "is an SDXL refiner checkpoint"),
    ({"model.diffusion_model.joint_blocks.0.x.weight": torch.zeros(2)},
     "is a Stable Diffusion 3 transformer but --config"),
    ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, "is not a Flux diffusers folder"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)},
     "is an inpainting or depth checkpoint (its U-Net takes 9 input channels)"),
])
def test_a_single_file_of_another_family_is_named_from_its_header(tmp_path, tiny_model_dir, weights, fragment):
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path))
    with pytest.raises(PFBDiffError, match="pfbdiff") as error:
        load_components(str(path), config=str(tiny_model_dir), device="cpu")
    assert fragment in str(error.value)


def test_a_flow_matching_schedule_is_not_read_as_a_diffusion_one():
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    for config in (FlowMatchEulerDiscreteScheduler().config,
                   {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}):
        with pytest.raises(PFBDiffError, match="flow-matching"):
            DDIMGrid.from_scheduler_config(config, 4)
    assert DDIMGrid.from_scheduler_config(EulerDiscreteScheduler().config, 4).num_steps == 4  # SD 2.1 ships Euler


def test_the_paper_presets_are_refused_on_a_u_net_that_is_not_sd1():
    """The bundled model's U-Net has three levels and 13 blocks; the paper presets number SD 1.x's 25."""
    from pfbdiff import get_preset, load_pipeline

    pipe = load_pipeline("shapes", quiet=True)
    with pytest.raises(PFBDiffError, match="the paper-\\* presets run on SD 1.x models only"):
        pipe.blend_plan(get_preset("paper-object"))
    assert pipe.blend_plan(get_preset("object")).blend_points  # the level-based presets carry over
