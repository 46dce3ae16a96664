"""A model carries the steps and guidance scale it is meant to be run with (``pfbdiff.json`` in its folder), and
every face's defaults follow them: the bundled ShapesWorld model is run at 20 steps and guidance 4, as it is
evaluated; a model that says nothing gets diffusers' 50 steps and 7.5."""

import json
import shutil

import numpy as np
import torch
from typer.testing import CliRunner

from pfbdiff.apps.cli import app
from pfbdiff.apps.request import EditRequest
from pfbdiff.models import catalog
from pfbdiff.pipeline import load_pipeline


def test_the_bundled_model_recommends_what_it_is_evaluated_with(tiny_model_dir, tmp_path):
    assert catalog.recommended_settings("shapes") == {"num_inference_steps": 20, "guidance_scale": 4.0}
    assert catalog.recommended_settings(str(tiny_model_dir)) == catalog.DEFAULT_RECOMMENDED  # no pfbdiff.json
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / catalog.RECOMMENDED_FILE).write_text(json.dumps({"num_inference_steps": 2.5, "guidance_scale": -1}))
    assert catalog.recommended_settings(str(folder)) == catalog.DEFAULT_RECOMMENDED  # nonsense is ignored


def test_a_request_without_steps_or_guidance_takes_its_models(tiny_model_dir):
    request = EditRequest.checked(image="a.png", mask="m.png", prompt="a dog", model="shapes")
    assert (request.steps, request.guidance_scale) == (20, 4.0)
    request = EditRequest.checked(image="a.png", mask="m.png", prompt="a dog", model=str(tiny_model_dir))
    assert (request.steps, request.guidance_scale) == (50, 7.5)
    request = EditRequest.checked(image="a.png", mask="m.png", prompt="a dog", model="shapes", steps=3, guidance_scale=2)
    assert (request.steps, request.guidance_scale) == (3, 2)  # what the user says wins


def test_the_pipeline_defaults_to_the_models_recommendation(tiny_model_dir, tmp_path, photo, box_mask):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / catalog.RECOMMENDED_FILE).write_text(json.dumps({"num_inference_steps": 3, "guidance_scale": 2.0}))
    pipe = load_pipeline(str(folder), quiet=True)
    assert pipe.recommended_settings == {"num_inference_steps": 3, "guidance_scale": 2.0}
    inversion = pipe.invert(photo, "a cat")
    assert inversion.grid.num_steps == 3
    by_default, said, other = (
        np.asarray(pipe.edit(inversion, box_mask, "a dog", output_type="np", generator=torch.Generator().manual_seed(0),
                             **guidance).images)
        for guidance in ({}, {"guidance_scale": 2.0}, {"guidance_scale": 7.5}))
    np.testing.assert_array_equal(by_default, said)
    assert np.abs(by_default - other).max() > 0


def test_the_cli_records_the_steps_and_guidance_it_used(files, tiny_model_dir, tmp_path):
    folder, image, mask = files
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / catalog.RECOMMENDED_FILE).write_text(json.dumps({"num_inference_steps": 2, "guidance_scale": 3.0}))
    out = folder / "out.png"
    result = CliRunner().invoke(app, ["edit", str(image), "-m", str(mask), "-p", "a dog", "--model", str(model),
                                      "-o", str(out), "--save-json"])
    assert result.exit_code == 0, result.output
    record = json.loads((folder / "out.json").read_text())
    assert (record["steps"], record["guidance_scale"]) == (2, 3.0)
