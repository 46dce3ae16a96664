"""Writing results (pfbdiff.io.outputs): PNG metadata round trip, atomic writes, inputs never overwritten."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import assert_user_error, pixel
from PIL import Image

from pfbdiff.errors import PFBDiffError
from pfbdiff.io.outputs import format_parameters, read_png_metadata, save_png

RED = (200, 30, 10)



METADATA = {"prompt": "a red car", "negative_prompt": "blurry", "seed": 7, "guidance_scale": 7.5,
            "size": [336, 520], "image": Path("/tmp/in.png"), "note": "naïve ✓"}


def leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_save_png_round_trips_metadata(tmp_path):
    path = save_png(Image.new("RGB", (5, 4), RED), tmp_path / "out.png", METADATA)
    assert path == tmp_path / "out.png"
    expected = json.loads(json.dumps(METADATA, default=str))
    assert read_png_metadata(path) == expected
    with Image.open(path) as written:
        assert written.size == (5, 4) and pixel(written.convert("RGB")) == RED
        parameters = written.text["parameters"]
    assert parameters.splitlines()[0] == "a red car"
    assert "Negative prompt: blurry" in parameters
    assert "Seed: 7" in parameters and "CFG scale: 7.5" in parameters and "Size: 336x520" in parameters
    assert leftovers(tmp_path) == []


def test_format_parameters_without_prompt():
    assert format_parameters({"steps": 50, "some_setting": True}) == "Steps: 50, Some setting: true"


def test_read_png_metadata_of_a_plain_png(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (2, 2)).save(path)
    assert read_png_metadata(path) == {}


def test_save_png_replaces_an_existing_output(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"old")
    save_png(Image.new("RGB", (2, 2)), path, {"seed": 1})
    assert read_png_metadata(path) == {"seed": 1}
    assert leftovers(tmp_path) == []


def test_failed_save_leaves_existing_file_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    path.write_bytes(b"old contents")

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(PFBDiffError) as excinfo:
        save_png(Image.new("RGB", (2, 2)), path, {})
    assert_user_error(excinfo, str(path), "No space left on device")
    assert path.read_bytes() == b"old contents"
    assert leftovers(tmp_path) == []


def test_refuses_to_overwrite_a_protected_input(tmp_path, monkeypatch):
    source = tmp_path / "photo.png"
    Image.new("RGB", (3, 3), RED).save(source)
    before = source.read_bytes()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PFBDiffError) as excinfo:
        save_png(Image.new("RGB", (3, 3)), "./photo.png", {}, protect={"input image": source, "mask": None})
    assert_user_error(excinfo, "refusing to overwrite the input image", str(source), "-o")
    with pytest.raises(PFBDiffError) as excinfo:
        save_png(Image.new("RGB", (3, 3)), source, {}, protect=[None, str(source)])
    assert_user_error(excinfo, "refusing to overwrite the input file")
    assert source.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_refuses_to_overwrite_through_a_symlink(tmp_path):
    source = tmp_path / "photo.png"
    Image.new("RGB", (3, 3), RED).save(source)
    before = source.read_bytes()
    link = tmp_path / "link.png"
    link.symlink_to(source)
    with pytest.raises(PFBDiffError):
        save_png(Image.new("RGB", (3, 3)), link, {}, protect=[source])
    assert source.read_bytes() == before


def test_missing_output_folder(tmp_path):
    folder = tmp_path / "missing"
    with pytest.raises(PFBDiffError) as excinfo:
        save_png(Image.new("RGB", (2, 2)), folder / "out.png", {})
    assert_user_error(excinfo, f"output folder does not exist: {folder}", "create it first")


def test_output_must_be_png(tmp_path):
    with pytest.raises(PFBDiffError) as excinfo:
        save_png(Image.new("RGB", (2, 2)), tmp_path / "out.jpg", {})
    assert_user_error(excinfo, ".png", "out.jpg")
    assert not (tmp_path / "out.jpg").exists()


def test_output_path_is_a_directory(tmp_path):
    folder = tmp_path / "result.png"
    folder.mkdir()
    with pytest.raises(PFBDiffError) as excinfo:
        save_png(Image.new("RGB", (2, 2)), folder, {})
    assert_user_error(excinfo, "directory", str(folder))


def test_save_png_converts_unusual_modes(tmp_path):
    path = save_png(Image.new("CMYK", (2, 2), (0, 255, 255, 0)), tmp_path / "cmyk.png", {})
    with Image.open(path) as written:
        assert written.mode == "RGB" and pixel(written) == (255, 0, 0)
