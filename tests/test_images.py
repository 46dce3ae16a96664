"""Tests for pfbdiff.io.images and pfbdiff.io.tensors: loading images and masks, and the round trips to model size."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import assert_user_error, pixel
from PIL import Image

from pfbdiff.errors import PFBDiffError
from pfbdiff.io import images
from pfbdiff.io.images import load_image, load_mask, mask_coverage, mask_extent
from pfbdiff.io.tensors import (
    convert_output,
    fit_to_multiple,
    image_to_tensor,
    mask_to_tensor,
    restore_size,
    tensor_to_pil,
)

RED = (200, 30, 10)


# ---------------------------------------------------------------------------------------------- PIL modes


def test_rgb_passes_through_unchanged():
    source = Image.new("RGB", (5, 3), RED)
    loaded = load_image(source)
    assert loaded.mode == "RGB" and loaded.size == (5, 3) and pixel(loaded) == RED


def test_rgba_is_flattened_onto_white():
    source = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    source.putpixel((1, 0), (0, 0, 0, 255))
    loaded = load_image(source)
    assert pixel(loaded, 0) == (255, 255, 255)
    assert pixel(loaded, 1) == (0, 0, 0)


def test_half_transparent_rgba_blends_with_white():
    loaded = load_image(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert all(abs(value - 127) <= 1 for value in pixel(loaded))


def test_la_is_flattened_onto_white():
    loaded = load_image(Image.new("LA", (1, 1), (0, 0)))
    assert pixel(loaded) == (255, 255, 255)


def test_palette_image_uses_its_colours():
    source = Image.new("RGB", (2, 2), RED).convert("P", palette=Image.Palette.ADAPTIVE)
    assert pixel(load_image(source)) == RED


def test_palette_transparency_is_flattened_onto_white():
    source = Image.new("P", (2, 1), 0)
    source.putpalette([0, 0, 0, 10, 20, 30] + [0] * (254 * 3))
    source.putpixel((1, 0), 1)
    source.info["transparency"] = 0
    loaded = load_image(source)
    assert pixel(loaded, 0) == (255, 255, 255)
    assert pixel(loaded, 1) == (10, 20, 30)


@pytest.mark.parametrize("mode, value, expected", [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255))])
def test_grey_modes_become_grey_rgb(mode, value, expected):
    assert pixel(load_image(Image.new(mode, (3, 2), value))) == expected


def test_cmyk_converts_to_rgb():
    loaded = load_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))
    assert loaded.mode == "RGB" and pixel(loaded) == (255, 0, 0)


def test_sixteen_bit_values_are_scaled_not_clipped():
    values = np.array([[0, 65535, 32896, 1000]], dtype=np.uint16)  # 32896 = 128 * 257
    loaded = load_image(Image.fromarray(values))
    assert [pixel(loaded, x)[0] for x in range(4)] == [0, 255, 128, 4]


def test_sixteen_bit_png_file(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((2, 3), 257 * 200, dtype=np.uint16)).save(path)
    assert pixel(load_image(path)) == (200, 200, 200)


def test_mode_i_is_treated_as_sixteen_bit():
    source = Image.fromarray(np.full((1, 1), 257 * 50, dtype=np.int32))
    assert source.mode == "I"
    assert pixel(load_image(source)) == (50, 50, 50)


@pytest.mark.parametrize("value, expected", [(0.5, 128), (128.0, 128)])
def test_float_mode_accepts_unit_and_byte_ranges(value, expected):
    source = Image.fromarray(np.full((2, 2), value, dtype=np.float32))
    assert source.mode == "F"
    assert pixel(load_image(source)) == (expected,) * 3


def test_exif_orientation_is_applied(tmp_path):
    # 4 wide × 2 high, left column red; orientation 6 means "rotate 90° clockwise to display".
    source = Image.new("RGB", (40, 20), (0, 0, 255))
    source.paste(RED, (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    source.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    top = np.asarray(loaded)[2, 10]  # the red left column is now the top row
    bottom = np.asarray(loaded)[37, 10]
    assert top[0] > 150 and top[2] < 80
    assert bottom[2] > 150 and bottom[0] < 80


# --------------------------------------------------------------------------------------- numpy and torch


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((2, 3), 77, dtype=np.uint8), (77, 77, 77)),
        (np.full((2, 3, 3), RED, dtype=np.uint8), RED),
        (np.full((2, 3, 4), (*RED, 255), dtype=np.uint8), RED),
        (np.full((2, 3, 4), (*RED, 0), dtype=np.uint8), (255, 255, 255)),
        (np.full((2, 3, 1), 9, dtype=np.uint8), (9, 9, 9)),
        (np.full((2, 3), 257 * 100, dtype=np.uint16), (100, 100, 100)),
        (np.ones((2, 3), dtype=bool), (255, 255, 255)),
        (np.full((2, 3, 3), 0.5, dtype=np.float32), (128, 128, 128)),
        (np.full((2, 3), 1.0, dtype=np.float64), (255, 255, 255)),
        (np.array([[0, 255, 255]]), (0, 0, 0)),  # int64 holding 8-bit values
    ],
)
def test_numpy_inputs(array, expected):
    loaded = load_image(array)
    assert loaded.mode == "RGB"
    assert loaded.size == (array.shape[1], array.shape[0])
    assert pixel(loaded) == expected


@pytest.mark.parametrize(
    "tensor, expected",
    [
        (torch.full((3, 2, 5), 0.5), (128, 128, 128)),  # C×H×W in [0, 1]
        (torch.full((1, 3, 2, 5), -1.0), (0, 0, 0)),  # 1×C×H×W in [-1, 1]
        (torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 2, 5), (0, 128, 255)),
        (torch.full((2, 5), 1.0), (255, 255, 255)),  # H×W
        (torch.full((1, 2, 5), 0.2, dtype=torch.bfloat16), (51, 51, 51)),
        (torch.full((3, 2, 5), 200, dtype=torch.uint8), (200, 200, 200)),
    ],
)
def test_torch_inputs(tensor, expected):
    loaded = load_image(tensor)
    assert loaded.size == (5, 2)
    assert pixel(loaded) == expected


@pytest.mark.parametrize(
    "source, fragment",
    [
        (np.zeros((2, 3, 5), dtype=np.uint8), "shape (2, 3, 5)"),
        (np.zeros((2, 3, 3, 1), dtype=np.uint8), "shape"),
        (np.zeros((2, 3), dtype=np.complex64), "data type complex64"),
        (np.full((2, 3), 255.0, dtype=np.float32), "[0, 1]"),
        (np.array([[0, 300]]), "0..300"),
        (np.full((2, 2), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((0, 4), dtype=np.uint8), "zero dimension"),
        (torch.zeros(2, 3, 4, 4), "batch of 2"),
        (torch.zeros(5, 4, 4), "shape (5, 4, 4)"),
        (torch.full((3, 4, 4), 3.0), "[0, 1]"),
        (Image.new("RGB", (0, 5)), "zero dimension (0×5)"),
        (12345, "int"),
    ],
)
def test_bad_in_memory_inputs(source, fragment):
    with pytest.raises(PFBDiffError) as excinfo:
        load_image(source)
    assert_user_error(excinfo, fragment)


# ------------------------------------------------------------------------------------------ file errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(PFBDiffError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, "image file not found", str(path))


def test_missing_mask_names_the_mask(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(PFBDiffError) as excinfo:
        load_mask(str(path))
    assert_user_error(excinfo, "mask file not found", str(path))


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(PFBDiffError) as excinfo:
        load_image(tmp_path)
    assert_user_error(excinfo, "directory", str(tmp_path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(PFBDiffError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, str(path), "is empty (0 bytes)")


@pytest.mark.parametrize("content", [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(PFBDiffError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, f"cannot read {path} as an image", "PNG/JPEG/WebP")


def test_truncated_file(tmp_path):
    path = tmp_path / "truncated.png"
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole)
    path.write_bytes(whole.read_bytes()[:300])
    with pytest.raises(PFBDiffError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, f"cannot read {path} as an image")


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(PFBDiffError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, str(path), "40×30", "too large", "MAX_PIXELS")


def test_pillow_bomb_error_becomes_user_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (40, 30)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow errors above twice this
    with pytest.raises(PFBDiffError) as excinfo:
        load_image(path)
    assert_user_error(excinfo, str(path), "too large")


# ------------------------------------------------------------------------------------------------ masks


def test_soft_mask_values_are_kept():
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(load_mask(values), values)
    grey = load_mask(Image.fromarray(np.array([[0, 64, 191, 255]], dtype=np.uint8)))
    assert grey.dtype == np.float32 and grey.shape == (1, 4)
    np.testing.assert_allclose(grey, [[0, 64 / 255, 191 / 255, 1]], atol=1e-6)


def test_sixteen_bit_mask_keeps_precision():
    mask = load_mask(Image.fromarray(np.array([[1000, 65535]], dtype=np.uint16)))
    np.testing.assert_allclose(mask, [[1000 / 65535, 1.0]], rtol=1e-6)


def test_colour_mask_uses_luminance():
    colours = np.array([[[255, 0, 0], [0, 255, 0], [255, 255, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(load_mask(colours), [[0.299, 0.587, 1.0]], atol=1e-3)


def test_alpha_only_mask_uses_alpha():
    # White strokes painted on a transparent layer: colour is constant, alpha carries the shape.
    painted = np.zeros((2, 2, 4), dtype=np.uint8)
    painted[..., :3] = 255
    painted[0, 0, 3] = 255
    painted[1, 1, 3] = 128
    mask = load_mask(Image.fromarray(painted))
    np.testing.assert_allclose(mask, [[1.0, 0.0], [0.0, 128 / 255]], atol=1e-6)


def test_black_strokes_on_transparent_layer_also_use_alpha():
    painted = np.zeros((1, 2, 4), dtype=np.uint8)
    painted[0, 1, 3] = 255
    np.testing.assert_allclose(load_mask(painted), [[0.0, 1.0]])


def test_palette_mask_with_transparency_uses_alpha():
    painted = Image.new("P", (2, 1), 0)
    painted.putpalette([255, 255, 255] * 2 + [0] * (254 * 3))
    painted.putpixel((1, 0), 1)
    painted.info["transparency"] = 0  # index 0 transparent, index 1 opaque, both white
    np.testing.assert_allclose(load_mask(painted), [[0.0, 1.0]])


def test_opaque_rgba_mask_uses_luminance():
    opaque = np.full((1, 2, 4), 255, dtype=np.uint8)
    opaque[0, 0, :3] = 0
    np.testing.assert_allclose(load_mask(opaque), [[0.0, 1.0]])


def test_transparent_parts_of_a_coloured_mask_are_kept():
    varied = np.array([[[255, 255, 255, 255], [255, 255, 255, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(load_mask(varied), [[1.0, 0.0, 0.0]])


def test_mask_from_file_and_torch(tmp_path):
    path = tmp_path / "mask.png"
    Image.new("L", (6, 4), 255).save(path)
    assert load_mask(path).shape == (4, 6)
    np.testing.assert_allclose(load_mask(torch.full((1, 1, 4, 6), 0.75)), np.full((4, 6), 0.75))


def test_negative_mask_tensor_is_rejected():
    with pytest.raises(PFBDiffError) as excinfo:
        load_mask(torch.full((4, 4), -0.5))
    assert_user_error(excinfo, "mask", "[0, 1]")


def test_matching_mask_size_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_mask(np.zeros((4, 6), dtype=np.float32), size=(6, 4)).shape == (4, 6)


def test_mask_size_mismatch_warns_and_resizes():
    mask = np.zeros((50, 60), dtype=np.float32)
    mask[:, 30:] = 1.0
    with pytest.warns(UserWarning, match="60×50.*120×100") as record:
        resized = load_mask(mask, size=(120, 100))
    assert "aspect" not in str(record[0].message)
    assert resized.shape == (100, 120)
    assert resized.min() >= 0.0 and resized.max() <= 1.0
    assert resized[:, :55].max() < 0.05 and resized[:, 65:].min() > 0.95


def test_mask_of_another_aspect_ratio_is_refused():
    with pytest.raises(PFBDiffError, match="aspect ratios differ"):
        load_mask(np.ones((64, 64), dtype=np.float32), size=(333, 517))


def test_empty_and_full_masks_are_described():
    assert mask_extent(np.zeros((4, 4))) == "empty"
    assert mask_extent(np.full((4, 4), 0.4)) == "empty"  # nothing reaches the 0.5 threshold
    assert mask_extent(np.ones((4, 4))) == "full"
    partial = np.zeros((4, 4))
    partial[0] = 1.0
    assert mask_extent(partial) == "partial"
    assert mask_coverage(partial) == pytest.approx(0.25)
    assert mask_coverage(torch.ones(2, 2)) == 1.0


# ------------------------------------------------------------------------------------ model-size round trip


@pytest.mark.parametrize(
    "size, expected",
    [((333, 517), (336, 520)), ((512, 768), (512, 768)), ((3, 1000), (8, 1000)), ((12, 20), (16, 24))],
)
def test_fit_to_multiple(size, expected):
    assert fit_to_multiple(size) == expected


def test_fit_to_multiple_other_multiple_and_errors():
    assert fit_to_multiple((100, 70), multiple=64) == (128, 64)
    with pytest.raises(PFBDiffError):
        fit_to_multiple((0, 10))
    with pytest.raises(PFBDiffError):
        fit_to_multiple((10, 10), multiple=0)


def test_non_square_round_trip_keeps_the_original_size():
    original = Image.fromarray(np.random.default_rng(1).integers(0, 255, (517, 333, 3), dtype=np.uint8))
    model_size = fit_to_multiple(original.size)
    tensor = image_to_tensor(original, model_size)
    assert tensor.shape == (1, 3, 520, 336) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    restored = restore_size(tensor_to_pil(tensor)[0], original.size)
    assert restored.size == (333, 517)


def test_image_tensor_round_trip_is_exact_without_resizing():
    original = Image.fromarray(np.random.default_rng(2).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    tensor = image_to_tensor(original)
    assert tensor.shape == (1, 3, 16, 24)
    np.testing.assert_array_equal(np.asarray(tensor_to_pil(tensor)[0]), np.asarray(original))


def test_mask_to_tensor_resizes_and_clips():
    mask = np.zeros((10, 20), dtype=np.float32)
    mask[:, 10:] = 1.0
    tensor = mask_to_tensor(mask, (40, 16))
    assert tensor.shape == (1, 1, 16, 40)
    assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    assert mask_to_tensor(mask).shape == (1, 1, 10, 20)


def test_tensor_to_pil_clamps_out_of_range_values():
    tensor = torch.tensor([-3.0, 0.0, 3.0]).view(1, 3, 1, 1)
    assert pixel(tensor_to_pil(tensor)[0]) == (0, 128, 255)


def test_restore_size_is_a_no_op_when_size_matches():
    image = Image.new("RGB", (7, 5))
    assert restore_size(image, (7, 5)) is image


def test_convert_output_types():
    batch = torch.zeros(2, 3, 4, 6)
    pil = convert_output(batch, "pil")
    assert len(pil) == 2 and pil[0].size == (6, 4)
    array = convert_output(batch, "np")
    assert isinstance(array, np.ndarray) and array.shape == (2, 4, 6, 3) and array.dtype == np.float32
    assert np.allclose(array, 0.5)
    tensor = convert_output(batch, "pt")
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, 3, 4, 6)
    assert torch.allclose(tensor, torch.full_like(tensor, 0.5))
    with pytest.raises(PFBDiffError) as excinfo:
        convert_output(batch, "jpeg")
    assert_user_error(excinfo, "'jpeg'", "'pil'", "'np'", "'pt'")
