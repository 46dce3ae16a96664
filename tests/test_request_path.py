"""One request path: the command line, a batch manifest line and the web page all become an ``EditRequest`` that
``apps.request.run_request`` runs, so the same edit gives the same pixels and the same record from every face,
and every face's PNG replays bit for bit with ``pfbdiff edit --from-json``."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pfbdiff.apps.cli import app
from pfbdiff.apps.provenance import model_reference
from pfbdiff.apps.request import EditRequest
from pfbdiff.errors import PFBDiffError
from pfbdiff.io.outputs import read_png_metadata
from pfbdiff.pipeline import load_pipeline

runner = CliRunner()
#: Record keys that name where the inputs and outputs of one face live (paths, their digests, batch bookkeeping).
WHERE = {"image", "mask", "image_sha256", "mask_sha256", "line", "output", "batch_hash", "edit_region_file"}


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _what(record):
    return {k: v for k, v in record.items() if k not in WHERE}


def test_cli_batch_and_ui_make_the_same_pixels_and_records_and_each_replays(files, tiny_model_dir):
    pytest.importorskip("gradio", reason="the web UI needs gradio (pip install -e '.[ui,test]')")
    from pfbdiff.apps import ui

    folder, image, mask = files
    model = str(tiny_model_dir)
    edit = ["-p", "a dog", "-s", "a cat", "--steps", "2", "--seed", "5", "-g", "3", "--model", model]
    cli = runner.invoke(app, ["edit", str(image), "-m", str(mask), *edit, "-o", str(folder / "cli.png")])
    assert cli.exit_code == 0, cli.output

    line = {"image": image.name, "mask": mask.name, "prompt": "a dog", "source_prompt": "a cat", "seed": 5,
            "output": "batch.png"}
    (folder / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    batch = runner.invoke(app, ["batch", str(folder / "manifest.jsonl"), "--out", str(folder / "out"), "--model", model,
                                "--steps", "2", "-g", "3"])
    assert batch.exit_code == 0, batch.output

    session = ui.EditSession(load_pipeline(model, quiet=True), model_reference(model), output_dir=folder / "ui")
    page = session.run(Image.open(image), Image.open(mask), "a dog", source_prompt="a cat", steps=2, guidance=3.0,
                       seed=5)

    outputs = {"cli": folder / "cli.png", "batch": folder / "out" / "batch.png", "ui": page.path}
    pixels = {face: _pixels(path) for face, path in outputs.items()}
    records = {face: read_png_metadata(path) for face, path in outputs.items()}
    assert np.array_equal(pixels["cli"], pixels["batch"]) and np.array_equal(pixels["cli"], pixels["ui"])
    assert _what(records["cli"]) == _what(records["batch"]) == _what(records["ui"])
    for face, path in outputs.items():
        again = folder / f"again-{face}.png"
        replayed = runner.invoke(app, ["edit", "--from-json", str(path), "-o", str(again)])
        assert replayed.exit_code == 0, replayed.output
        assert np.array_equal(_pixels(again), pixels[face]), face


@pytest.mark.parametrize("values, parameter, fragment", [
    (dict(steps=0), "steps", "must be at least 1"),
    (dict(steps=2.5), "steps", "must be an integer"),
    (dict(seed=2**64), "seed", "between 0 and 2**64 - 1"),
    (dict(guidance_scale=float("nan")), "guidance_scale", "must be a finite number"),
    (dict(feather=-2), "feather", "must be 0 or more pixels"),
    (dict(crop="yes"), "crop", 'must be "auto", true or false'),
    (dict(paste_back="no"), "paste_back", "must be true or false"),
    (dict(inside=[1]), "inside", "must be a list of words"),
    (dict(auto_mask_threshold=1.0), "auto_mask_threshold", "must be in [0, 1)"),
    (dict(mask=None), "mask", "is required"),
])
def test_every_request_field_has_one_rule_named_in_library_terms(values, parameter, fragment):
    fields = {**dict(image="photo.png", mask="mask.png", prompt="a dog", model="tiny"), **values}
    with pytest.raises(PFBDiffError) as error:
        EditRequest.checked(**fields)
    assert error.value.parameter == parameter and fragment in str(error.value)
    assert error.value.naming(lambda name: f"--{name}").startswith(f"--{parameter} ")


def test_settings_given_as_text_or_json_values_resolve_to_the_same_config():
    from_text = EditRequest.checked(image="p.png", mask="m.png", prompt="a dog", model="tiny",
                                    settings={"t_combine": "200", "blend_levels": "-1,-2", "blend_skips": "true"})
    from_json = EditRequest.checked(image="p.png", mask="m.png", prompt="a dog", model="tiny",
                                    settings={"t_combine": 200, "blend_levels": [-1, -2], "blend_skips": True})
    assert from_text.edit_config == from_json.edit_config
    assert from_text.edit_config.blend_levels == (-1, -2)
    with pytest.raises(PFBDiffError, match="unknown setting 't_combin'"):
        EditRequest.checked(image="p.png", mask="m.png", prompt="a dog", model="tiny", settings={"t_combin": 1})
