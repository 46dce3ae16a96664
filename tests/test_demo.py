"""The offline demo: one inversion, an object and a background replacement, PNGs that never replace a user's file."""

import numpy as np
from helpers import within_outgrowth
from PIL import Image
from typer.testing import CliRunner

from pfbdiff.apps import demo
from pfbdiff.apps.cli import app
from pfbdiff.bench.cases import render_case
from pfbdiff.bench.metrics import edit_success
from pfbdiff.io.outputs import read_png_metadata
from pfbdiff.shapes.binary_masks import erode

runner = CliRunner()


def test_demo_cases_are_benchmark_cases_whose_ideal_passes_and_source_fails_the_oracles():
    for case in demo.demo_cases():
        images = render_case(case, 64)
        assert edit_success(images, images.ideal)["success"]
        assert not edit_success(images, images.source)["success"]
    object_case, background_case = (render_case(c, 64) for c in demo.demo_cases())
    circle = object_case.object_masks[0]
    assert object_case.mask[circle].all()  # the box covers the circle
    assert not background_case.mask[circle].any()  # the background mask leaves it alone
    assert (object_case.source == background_case.source).all()  # one picture, one inversion


def test_demo_edits_share_one_inversion(tiny_pipe):
    before = tiny_pipe.unet_calls
    edits = demo.run_demo(tiny_pipe, steps=3)
    assert tiny_pipe.unet_calls - before == 3 + 2 * 3  # inversion once, then two edits of 3 steps
    for edit in edits:
        outside = ~within_outgrowth(edit.images.mask)  # a new object may be followed past the mask (new_content.py)
        if edit.images.case.task == "background":  # the old background around the objects joins the edit (halo.py)
            outside = erode(edit.images.labels > 0, 1)
        assert np.array_equal(edit.result[outside], edit.images.source[outside])  # paste-back: untouched pixels kept
        assert set(edit.verdict) >= {"success", "target_present", "old_gone", "others_kept", "background_ok"}


def test_demo_command_writes_every_picture_and_reruns_into_its_own_folder(tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    args = ["demo", "--model", str(tiny_model_dir), "--out", str(out), "--steps", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in out.iterdir()) == sorted(demo.FILES)
    assert "object replacement" in first.output and "background replacement" in first.output
    side = Image.open(out / "demo.png")
    size = Image.open(out / "source.png").width * demo.VIEW_SCALE  # the model's native size, enlarged
    assert side.width == 5 * size + 4 * 4 and side.height == size + 16
    record = read_png_metadata(out / "object-edit.png")
    assert record["demo"] is True and record["prompt"] == "a blue square on a plain yellow background"
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output  # its own earlier output may be replaced


def test_demo_refuses_to_replace_a_file_it_did_not_write(tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    out.mkdir()
    mine = out / "source.png"
    Image.new("RGB", (4, 4), "red").save(mine)
    before = mine.read_bytes()
    done = runner.invoke(app, ["demo", "--model", str(tiny_model_dir), "--out", str(out), "--steps", "2"])
    assert done.exit_code == 2 and "not written by `pfbdiff demo`" in done.output and "Traceback" not in done.output
    assert mine.read_bytes() == before and [p.name for p in out.iterdir()] == ["source.png"]


def test_demo_without_the_bundled_model_names_the_fix(tmp_path, monkeypatch):
    from pfbdiff.models import catalog

    monkeypatch.setattr(catalog, "BUNDLED_SHAPES_MODEL", tmp_path / "missing")
    done = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert done.exit_code == 2 and "pfbdiff.shapes.train" in done.output and "Traceback" not in done.output
    assert not (tmp_path / "demo").exists()
