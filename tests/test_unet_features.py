"""The numbered U-Net blocks (docs/method.md §3) and the block-by-block forward pass with skip semantics (§4)."""

import pytest
import torch

from pfbdiff.engine.backbones.unet import FeatureUNet
from pfbdiff.engine.inversion import FeatureRecorder


@pytest.fixture(scope="module")
def unet(tiny_components):
    return FeatureUNet(tiny_components["unet"])


def test_sd_layout_has_25_blocks_numbered_as_in_the_method_doc(unet):
    parts = [b.part for b in unet.blocks]
    assert len(unet.blocks) == 25
    assert parts == ["encoder"] * 12 + ["middle"] + ["decoder"] * 12
    assert unet.middle_index == 13
    assert [b.level for b in unet.blocks] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0, 0]
    assert unet.blocks[6].name == "down_blocks.1.downsamplers.0"  # L7
    assert unet.blocks[15].name == "up_blocks.0.resnets.2"  # L16 includes the upsampler


def test_blocks_by_level_name_the_16x16_and_8x8_levels_of_sd(unet):
    assert unet.blocks_at_levels([-2, -1]) == tuple(range(7, 19))
    assert unet.blocks_at_levels([2, 3]) == tuple(range(7, 19))
    assert unet.attention_blocks_at_levels([1, 2, 3]) == (5, 6, 8, 9, 13, 17, 18, 19, 20, 21, 22)
    assert unet.attention_blocks_at_levels([1, 2, 3, 4]) == unet.attention_blocks_at_levels([1, 2, 3])  # no level 4
    assert unet.blocks_at_levels([-1]) == unet.blocks_at_levels([3])


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 4, 12, 20)])
def test_block_walk_equals_diffusers_forward_bitwise(unet, shape):
    torch.manual_seed(0)
    x, context = torch.randn(*shape), torch.randn(shape[0], 77, 32)
    with torch.no_grad():
        assert torch.equal(unet(x, 481, context), unet.unet(x, 481, context).sample)


def _skip_input_of_block_2(unet, x, context, hook, blend_skips):
    """Capture what the decoder concatenates as the skip from L2 (it enters up_blocks[3].resnets[1])."""
    captured = {}
    resnet = unet.unet.up_blocks[3].resnets[1]

    def capture(module, args):
        captured["input"] = args[0]

    handle = resnet.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            unet(x, 481, context, on_block=hook, blend_skips=blend_skips)
    finally:
        handle.remove()
    return captured["input"]


def test_skip_connections_carry_unblended_target_features(unet):
    torch.manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    recorder = FeatureRecorder({2})
    with torch.no_grad():
        unet(x, 481, context, on_block=recorder)
    zero_block_2 = lambda index, h: torch.zeros_like(h) if index == 2 else h  # noqa: E731
    own = recorder.features[2]
    skip = _skip_input_of_block_2(unet, x, context, zero_block_2, blend_skips=False)[:, -own.shape[1] :]
    assert torch.equal(skip, own)
    skip = _skip_input_of_block_2(unet, x, context, zero_block_2, blend_skips=True)[:, -own.shape[1] :]
    assert torch.equal(skip, torch.zeros_like(own))


def test_call_counter_counts_passes_and_rows(unet):
    before_calls, before_rows = unet.calls, unet.evaluations
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), 1, torch.randn(2, 77, 32))
    assert (unet.calls - before_calls, unet.evaluations - before_rows) == (1, 2)


def test_full_size_sd15_unet_blend_point_shapes():
    from pfbdiff.models.full_size import random_unet, sd15_unet_config

    unet = FeatureUNet(random_unet(sd15_unet_config(), seed=0))
    shapes = {}

    def record_shape(index, h):
        shapes[index] = tuple(h.shape[1:])
        return h

    with torch.no_grad():
        unet(torch.randn(1, 4, 64, 64), 981, torch.randn(1, 77, 768), on_block=record_shape)
    assert shapes[1] == (320, 64, 64) and shapes[4] == (320, 32, 32)
    assert shapes[7] == (640, 16, 16) and shapes[8] == (1280, 16, 16)
    assert shapes[10] == (1280, 8, 8) and shapes[12] == shapes[13] == (1280, 8, 8)
    assert shapes[16] == (1280, 16, 16) and shapes[19] == (1280, 32, 32)
    assert shapes[22] == (640, 64, 64) and shapes[25] == (320, 64, 64)


def test_full_size_sdxl_unet_blocks_attention_and_blend_point_shapes():
    """SDXL's 19 blocks (docs/method.md §12): three levels of 320, 640 and 1280 channels, cross-attention only at
    the two deeper ones (2 and 10 transformer layers) and in the middle, walked with the pooled vector and size ids."""
    from pfbdiff.engine.conditioning import Conditioning
    from pfbdiff.models.full_size import random_unet, sdxl_unet_config

    unet = FeatureUNet(random_unet(sdxl_unet_config(), seed=0, dtype=torch.bfloat16))
    assert len(unet.blocks) == 19 and unet.middle_index == 10 and unet.num_levels == 3
    assert unet.attention_blocks_at_levels([0]) == ()
    assert unet.attention_blocks_at_levels([1]) == (5, 6, 14, 15, 16)
    assert unet.attention_blocks_at_levels([2]) == (8, 9, 10, 11, 12, 13)
    layers = {b.index: len(b.cross_attentions) for b in unet.blocks if b.cross_attentions}
    assert {layers[i] for i in (5, 6, 14, 15, 16)} == {2} and {layers[i] for i in (8, 9, 10, 11, 12, 13)} == {10}
    assert unet.blocks_at_levels([-1]) == (7, 8, 9, 10, 11, 12) == unet.blocks_at_levels([2])  # by output size
    shapes = {}

    def record_shape(index, h):
        shapes[index] = tuple(h.shape[1:])
        return h

    conditioning = Conditioning(torch.randn(1, 77, 2048, dtype=torch.bfloat16), torch.randn(1, 1280, dtype=torch.bfloat16),
                                torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]], dtype=torch.bfloat16))
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 32, 32, dtype=torch.bfloat16), 981, conditioning, on_block=record_shape)
    assert out.shape == (1, 4, 32, 32) and torch.isfinite(out).all()
    assert shapes[1] == shapes[3] == (320, 32, 32) and shapes[4] == (320, 16, 16)
    assert shapes[5] == (640, 16, 16) and shapes[7] == (640, 8, 8) and shapes[8] == shapes[10] == (1280, 8, 8)
    assert shapes[13] == (1280, 16, 16) and shapes[16] == (640, 32, 32) and shapes[19] == (320, 32, 32)
