"""Provenance and the photo options of ``pfbdiff edit``: records in the PNG and as JSON, bit-exact replays,
--auto-mask files, --grow / --feather / --crop / --paste-back, and the empty-mask copy."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pfbdiff import PFBDiffError
from pfbdiff.apps.cli import app
from pfbdiff.apps.provenance import load_record
from pfbdiff.apps.request import EditRequest, replay
from pfbdiff.io.outputs import read_png_metadata

runner = CliRunner()


def _edit(*args):
    result = runner.invoke(app, ["edit", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_record_in_png_and_json_and_bit_exact_replay_from_either(files, tiny_model_dir, tiny_pipe):
    folder, image, mask = files
    out = folder / "edited.png"
    _edit(image, "-m", mask, "-p", "a dog", "-s", "a cat", "--steps", 3, "--seed", 7, "--model", tiny_model_dir,
          "--grow", 2, "--feather", 3, "--set", "t_combine=100", "-o", out, "--save-json")
    record = json.loads((folder / "edited.json").read_text())
    assert record == read_png_metadata(out)
    for key, value in dict(prompt="a dog", source_prompt="a cat", steps=3, seed=7, preset="object", feather=3,
                           grow=2, paste_back=True, crop="auto", crop_box=[0, 0, 128, 96], size=[128, 96],
                           settings={"t_combine": 100, "grow": 2}).items():
        assert record[key] == value, key
    assert record["model"] == str(tiny_model_dir.resolve()) and record["image"] == str(image.resolve())
    assert {"torch", "diffusers", "transformers", "pfbdiff", "python"} <= set(record["versions"])
    assert len(record["image_sha256"]) == 64 and record["device"] == "cpu" and record["dtype"] == "float32"

    again = folder / "again.png"
    _edit("--from-json", folder / "edited.json", "-o", again)
    assert np.array_equal(_pixels(again), _pixels(out))
    from_png = folder / "from-png.png"
    _edit("--from-json", out, "-o", from_png)
    assert np.array_equal(_pixels(from_png), _pixels(out))
    result = replay(record).result
    assert np.array_equal(np.asarray(result.images[0]), _pixels(out))

    varied = folder / "varied.png"
    _edit("--from-json", folder / "edited.json", "--feather", 0, "-o", varied)
    assert read_png_metadata(varied)["feather"] == 0 and read_png_metadata(varied)["seed"] == 7


def test_replay_refuses_changed_inputs_and_bad_records(files, tiny_model_dir):
    folder, image, mask = files
    out = folder / "edited.png"
    _edit(image, "-m", mask, "-p", "a dog", "--steps", 1, "--model", tiny_model_dir, "-o", out, "--save-json")
    Image.fromarray(np.zeros((96, 128, 3), np.uint8)).save(image)
    result = runner.invoke(app, ["edit", "--from-json", str(folder / "edited.json"), "-o", str(folder / "x.png")])
    assert result.exit_code == 2 and "has changed since the record was written" in result.output
    (folder / "bad.json").write_text("[1, 2]")
    with pytest.raises(PFBDiffError, match="not a JSON record"):
        load_record(folder / "bad.json")
    with pytest.raises(PFBDiffError, match="names no image or prompt"):
        EditRequest.from_record({"steps": 3})


def test_auto_mask_is_saved_next_to_the_output_and_bounded_by_the_mask(files, tiny_model_dir, box_mask, photo):
    folder, image, mask = files
    out = folder / "auto.png"
    result = _edit(image, "-m", mask, "-p", "a dog", "-s", "a cat", "--steps", 2, "--model", tiny_model_dir,
                   "--auto-mask", "--auto-mask-threshold", 0.2, "-o", out)
    estimate = np.asarray(Image.open(folder / "auto.mask.png"))
    assert "auto.mask.png" in result.output.replace("\n", "")
    assert estimate.max() == 255 and (estimate[box_mask == 0] == 0).all()
    assert np.array_equal(_pixels(out)[box_mask == 0], photo[box_mask == 0])
    assert read_png_metadata(out)["auto_mask"] is True


def test_no_paste_back_no_crop_and_crop_options(files, tiny_model_dir, photo):
    folder, image, mask = files
    _edit(image, "-m", mask, "-p", "a dog", "--steps", 1, "--model", tiny_model_dir, "--no-paste-back", "-o", folder / "raw.png")
    assert not np.array_equal(_pixels(folder / "raw.png")[0:8], photo[0:8])
    _edit(image, "-m", mask, "-p", "a dog", "--steps", 1, "--model", tiny_model_dir, "--crop", "--crop-padding", 4,
          "-o", folder / "crop.png")
    meta = read_png_metadata(folder / "crop.png")
    assert meta["crop"] is True and meta["crop_padding"] == 4 and meta["crop_box"] == [28, 20, 100, 76]


def test_all_black_mask_fails_or_copies_the_photo_only_when_asked(files, tiny_model_dir, photo):
    folder, image, _ = files
    black = folder / "black.png"
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(black)
    failed = runner.invoke(app, ["edit", str(image), "-m", str(black), "-p", "a dog", "--model", str(tiny_model_dir),
                                 "-o", str(folder / "none.png")])
    assert failed.exit_code == 2 and "all black" in failed.output and not (folder / "none.png").exists()
    _edit(image, "-m", black, "-p", "a dog", "--model", tiny_model_dir, "--copy-if-empty", "-o", folder / "copy.png")
    assert np.array_equal(_pixels(folder / "copy.png"), photo)


def test_alpha_only_mask_file_and_missing_arguments(files, tiny_model_dir, box_mask, photo):
    folder, image, _ = files
    rgba = np.zeros((96, 128, 4), np.uint8)
    rgba[..., 3] = (box_mask * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    _edit(image, "-m", folder / "alpha.png", "-p", "a dog", "--steps", 1, "--model", tiny_model_dir, "-o", folder / "a.png")
    assert np.array_equal(_pixels(folder / "a.png")[0:10], photo[0:10])
    for argv, message in ((["-p", "a dog"], "missing IMAGE, --mask:"), ([str(image), "-p", "a dog"], "missing --mask:"),
                          ([str(image), "-m", str(folder / "alpha.png")], "missing --prompt:"),
                          ([str(image), "-m", str(folder / "alpha.png"), "-p", "a", "--feather", "-1"], "--feather must be")):
        result = runner.invoke(app, ["edit", *argv, "-o", str(folder / "x.png"), "--model", str(tiny_model_dir)])
        assert result.exit_code == 2 and message in result.output, result.output
