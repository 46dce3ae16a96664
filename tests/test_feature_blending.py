"""Progressive feature blending (docs/method.md §4, §10 properties 5 and 13) and mask resizing."""

import torch

from pfbdiff.engine.blending import FeatureBlender
from pfbdiff.engine.edit_mask import EditMask, resize_mask
from pfbdiff.engine.presets import get_preset


def _half_mask(size=16):
    latent = torch.zeros(1, 1, size, size)
    latent[..., :, : size // 2] = 1.0
    return latent


def test_blend_locality_exact_source_where_mask_is_0_and_target_where_1():
    torch.manual_seed(0)
    for mode in ("area", "bicubic"):
        mask = EditMask(_half_mask(), mode)
        target, source = torch.randn(2, 8, 4, 4), torch.randn(1, 8, 4, 4)
        out = FeatureBlender({9: source}, mask, {9})(9, target)
        weight = mask.at((4, 4))[0, 0]
        for row in range(2):
            assert torch.equal(out[row][:, weight == 1], target[row][:, weight == 1])
            assert torch.equal(out[row][:, weight == 0], source[0][:, weight == 0])


def test_blocks_that_are_not_blend_points_pass_unchanged():
    h = torch.randn(2, 8, 4, 4)
    assert FeatureBlender({9: torch.zeros(1, 8, 4, 4)}, EditMask(_half_mask()), {9})(8, h) is h


def test_reference_middle_quirk_mixes_block_12_with_source_middle_output(tiny_pipe):
    plan = tiny_pipe.blend_plan(get_preset("paper-object"))
    assert plan.source_of == {12: 13}
    src12, src13 = torch.zeros(1, 8, 2, 2), torch.ones(1, 8, 2, 2)
    blender = FeatureBlender({12: src12, 13: src13}, EditMask(torch.zeros(1, 1, 16, 16)), plan.blend_points, plan.source_of)
    assert torch.equal(blender(12, torch.randn(2, 8, 2, 2)), torch.ones(2, 8, 2, 2))
    assert tiny_pipe.blend_plan(get_preset("object")).source_of == {}


def test_the_two_lowest_resolution_levels_are_the_encoder_tail_middle_and_decoder_head_blocks(tiny_pipe):
    # blend_levels=(-2, -1) on the SD layout: blocks 7-12 (encoder), 13 (middle), 14-18 (decoder)
    assert tiny_pipe.blend_plan(get_preset("object")).blend_points == set(range(7, 19))


def test_bicubic_reference_resize_overshoots_and_area_stays_in_unit_range():
    mask = (torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    bicubic = resize_mask(mask, (16, 16), "bicubic")
    area = resize_mask(mask, (16, 16), "area")
    assert bicubic.min() < 0 and bicubic.max() > 1
    assert area.min() >= 0 and area.max() <= 1
    assert torch.equal(resize_mask(torch.ones(1, 1, 64, 64), (8, 8), "bicubic"), torch.ones(1, 1, 8, 8))


def test_area_resize_keeps_soft_values_and_region_area():
    mask = torch.full((1, 1, 64, 64), 0.3)
    assert torch.allclose(resize_mask(mask, (8, 8), "area"), torch.full((1, 1, 8, 8), 0.3))
    box = torch.zeros(1, 1, 64, 64)
    box[..., :16, :32] = 1
    assert resize_mask(box, (8, 8), "area").mean() == box.mean()
