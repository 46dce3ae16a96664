"""The command line: a real edit, readable help, and every user mistake as one line with exit code 2."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pfbdiff.apps.cli import app
from pfbdiff.io.outputs import read_png_metadata

runner = CliRunner()


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_edit_writes_a_png_with_its_parameters(files, tiny_model_dir):
    folder, image, mask = files
    out = folder / "edited.png"
    result = runner.invoke(app, ["edit", str(image), "--mask", str(mask), "--prompt", "a dog", "--source-prompt", "a cat",
                                 "--steps", "3", "--model", str(tiny_model_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and str(out) in result.output.replace("\n", "")
    assert Image.open(out).size == (128, 96)
    meta = read_png_metadata(out)
    assert meta["prompt"] == "a dog" and meta["steps"] == 3 and meta["preset"] == "object"


def test_any_method_setting_can_be_set_and_is_recorded(files, tiny_model_dir):
    folder, image, mask = files
    out = folder / "set.png"
    result = runner.invoke(app, ["edit", str(image), "-m", str(mask), "-p", "a dog", "--steps", "2", "-o", str(out),
                                 "--model", str(tiny_model_dir), "--set", "t_combine=500", "--set", "blend_levels=-1",
                                 "--set", "blend_skips=true"])
    assert result.exit_code == 0, result.output
    assert read_png_metadata(out)["settings"] == {"t_combine": 500, "blend_levels": [-1], "blend_skips": True}


def _bad(files, tiny_model_dir, change):
    folder, image, mask = files
    args = {"image": str(image), "--mask": str(mask), "--prompt": "a dog", "-o": str(folder / "out.png"),
            "--model": str(tiny_model_dir), "--steps": "2"}
    args.update(change(folder))
    argv = ["edit", args.pop("image")] + [x for k, v in args.items() for x in (k, v)]
    return runner.invoke(app, argv)


BAD_INPUTS = {
    "missing image": (lambda d: {"image": str(d / "nope.png")}, "not found"),
    "corrupt image": (lambda d: {"image": str(_write(d / "bad.png", b"not an image at all"))}, "cannot read"),
    "empty image file": (lambda d: {"image": str(_write(d / "empty.png", b""))}, "0 bytes"),
    "mask of another shape": (lambda d: {"--mask": str(_mask_of_size(d, (64, 64)))}, "aspect ratios differ"),
    "all-black mask": (lambda d: {"--mask": str(_mask_of_size(d, (128, 96), 0))}, "all black"),
    "unknown preset": (lambda d: {"--preset": "objekt"}, "unknown preset 'objekt'"),
    "zero steps": (lambda d: {"--steps": "0"}, "--steps must be at least 1"),
    "negative steps": (lambda d: {"--steps": "-3"}, "--steps must be at least 1"),
    "strength above one": (lambda d: {"--strength": "1.5"}, "strength must be in (0, 1]"),
    "strength zero": (lambda d: {"--strength": "0"}, "strength must be in (0, 1]"),
    "output in a missing folder": (lambda d: {"-o": str(d / "missing" / "out.png")}, "output folder does not exist"),
    "output equal to the input": (lambda d: {"-o": str(d / "photo.png")}, "refusing to overwrite the input image"),
    "output equal to the mask": (lambda d: {"-o": str(d / "mask.png")}, "refusing to overwrite the mask"),
    "word not in the prompt": (lambda d: {"--inside": "cat"}, "'cat' does not occur in the prompt"),
    "missing model": (lambda d: {"--model": str(d / "no-model")}, "not found"),
    "unknown setting": (lambda d: {"--set": "t_combin=200"}, "unknown setting 't_combin'"),
    "setting without a value": (lambda d: {"--set": "t_combine"}, "--set takes KEY=VALUE"),
    "unreadable setting": (lambda d: {"--set": "t_combine=soon"}, "cannot read 'soon'"),
}


def _write(path, data):
    path.write_bytes(data)
    return path


def _mask_of_size(folder, size, value=255):
    path = folder / f"mask-{size[0]}x{size[1]}-{value}.png"
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_no_traceback_nothing_written(files, tiny_model_dir, case):
    folder, image, mask = files
    before = {p.name: _digest(p) for p in folder.iterdir() if p.is_file()}
    change, message = BAD_INPUTS[case]
    result = _bad(files, tiny_model_dir, change)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    after = {p.name: _digest(p) for p in folder.iterdir() if p.is_file() and p.name in before}
    assert after == before  # inputs untouched
    assert {p.name for p in folder.iterdir()} - set(before) - {"bad.png", "empty.png"} - {
        p.name for p in folder.glob("mask-*.png")} == set()  # nothing written


def test_help_of_every_command_reads_well():
    for argv in (["--help"], ["edit", "--help"], ["bench", "speed", "--help"], ["presets", "--help"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0 and "Usage" in result.output
    wide = runner.invoke(app, ["edit", "--help"], env={"COLUMNS": "250"}).output
    assert "white = region to change" in wide and "--source-prompt" in wide


def test_an_attribute_edit_that_leaves_part_of_the_mask_says_so_and_saves_the_region_it_changed(tmp_path,
                                                                                                  tiny_model_dir):
    """The attribute preset's inner halo: the old background between a coarse mask and the subject stays the
    photo's own, and the user is told how much of the mask was left and where the edit went."""
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[...] = (40, 60, 200)
    yy, xx = np.mgrid[0:64, 0:64]
    photo[np.hypot(yy - 32, xx - 32) < 12] = (210, 40, 30)  # a red disc on blue
    mask = np.zeros((64, 64), np.uint8)
    mask[14:50, 14:50] = 255  # a coarse box around it
    Image.fromarray(photo).save(tmp_path / "disc.png")
    Image.fromarray(mask).save(tmp_path / "box.png")
    result = runner.invoke(app, ["edit", str(tmp_path / "disc.png"), "-m", str(tmp_path / "box.png"), "-p", "a green disc",
                                 "--preset", "attribute", "--steps", "2", "--model", str(tiny_model_dir),
                                 "-o", str(tmp_path / "green.png"), "--save-json"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "green.json").read_text())
    region = np.asarray(Image.open(tmp_path / "green.region.png")) > 0
    left = (mask > 0) & ~region
    assert record["kept_inside_mask"] == np.count_nonzero(left) > 0 and record["changed_outside_mask"] == 0
    assert f"left {record['kept_inside_mask']} pixels of your mask as they were" in " ".join(result.output.split())
    edited = np.asarray(Image.open(tmp_path / "green.png").convert("RGB"))
    assert np.array_equal(edited[~region], photo[~region])
    assert region[np.hypot(yy - 32, xx - 32) < 11].all()  # the disc itself is edited


def test_python_dash_m_runs_the_same_cli():
    result = subprocess.run([sys.executable, "-m", "pfbdiff", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("pfbdiff ")


def test_an_edit_that_reaches_past_the_mask_says_so_and_saves_the_region_it_changed(files, tiny_model_dir):
    folder, image, mask = files
    photo, user_mask = np.asarray(Image.open(image).convert("RGB")), np.asarray(Image.open(mask)) > 0
    printed = {}
    for grow, outgrow, name in ((0, 0, "kept"), (6, 0.25, "grown")):
        result = runner.invoke(app, ["edit", str(image), "-m", str(mask), "-p", "a dog", "--steps", "2", "--grow",
                                     str(grow), "--set", f"outgrow={outgrow}", "--model", str(tiny_model_dir),
                                     "-o", str(folder / f"{name}.png"), "--save-json"])
        assert result.exit_code == 0, result.output
        printed[name] = " ".join(result.output.split())
    assert json.loads((folder / "kept.json").read_text())["changed_outside_mask"] == 0
    assert not (folder / "kept.region.png").exists() and "outside your mask" not in printed["kept"]
    record = json.loads((folder / "grown.json").read_text())
    region = np.asarray(Image.open(folder / "grown.region.png")) > 0
    assert record["edit_region_file"] == str(folder / "grown.region.png")
    assert record["changed_outside_mask"] == np.count_nonzero(region & ~user_mask) > 0
    assert f"changed {record['changed_outside_mask']} pixels outside your mask" in printed["grown"]
    edited = np.asarray(Image.open(folder / "grown.png").convert("RGB"))
    assert np.array_equal(edited[~region], photo[~region])  # outside the region it names, the photo's own pixels
    assert not np.array_equal(edited[region & ~user_mask], photo[region & ~user_mask])
