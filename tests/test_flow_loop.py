"""The PFB-Diff loop on a rectified flow (docs/method.md §16), on a tiny SD3-shaped transformer: the exact
properties of the U-Net loop, carried over."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers import LATENT, tiny_flux_transformer, tiny_sd3_transformer

from pfbdiff.engine.backbones.transformer import FeatureTransformer, token_mask
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.flow import FlowGrid, integrate
from pfbdiff.engine.flow_loop import flow_pfb_loop, recomputed_flow_features

STEPS = 4


def _setup():
    walker = FeatureTransformer(tiny_sd3_transformer())
    generator = torch.Generator().manual_seed(0)
    source_text, target_text = torch.randn(2, 1, 6, 16, generator=generator)
    pooled = torch.randn(1, 8, generator=generator)  # the source's pooled vector, on both branches

    def velocity_with(text):
        def velocity(x, sigma, on_block=None):
            return walker(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                          timestep=torch.tensor([1000.0 * sigma]), on_block=on_block)
        return velocity

    sigmas = FlowGrid.from_scheduler_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, STEPS).sigmas
    photo = torch.randn(1, 4, LATENT, LATENT, generator=generator)
    with torch.no_grad():
        source_latents = integrate(lambda x, s: velocity_with(source_text)(x, s), photo, sigmas, "euler")
    latent = torch.zeros(1, 1, LATENT, LATENT)
    latent[..., 0:4, 2:8] = 1  # whole 2 × 2 patches: whole tokens
    return walker, velocity_with(source_text), velocity_with(target_text), sigmas, source_latents, EditMask(latent)


def test_a_loop_that_blends_nothing_is_plain_flow_sampling_bit_for_bit():
    walker, source_v, target_v, sigmas, source_latents, mask = _setup()
    noise = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1))
    edited = flow_pfb_loop(target_v, noise, source_latents, sigmas, lambda n: {}, mask, mask.latent,
                           blend_points=(), latent_blend=1.0)
    with torch.no_grad():
        plain = integrate(lambda x, s: target_v(x, s), noise, tuple(reversed(sigmas)), "euler")[-1]
    assert torch.equal(edited, plain)


def test_with_every_block_blended_the_velocity_outside_the_mask_is_the_sources_and_the_latent_is_kept():
    walker, source_v, target_v, sigmas, source_latents, mask = _setup()
    every = [block.index for block in walker.blocks]
    features = recomputed_flow_features(source_v, source_latents, sigmas, every)
    seen = {}
    edited = flow_pfb_loop(target_v, source_latents[-1], source_latents, sigmas, features, mask, mask.latent,
                           blend_points=every, latent_blend=-1.0,
                           on_step=lambda n, velocity, x: seen.setdefault(n, velocity))
    outside = (mask.latent == 0).expand(1, 4, LATENT, LATENT)
    for n, velocity in seen.items():
        with torch.no_grad():
            source = source_v(source_latents[n + 1], sigmas[n + 1])
        assert torch.equal(velocity[outside], source[outside])
        assert not torch.equal(velocity[~outside], source[~outside])  # inside, the edit's words act
    assert torch.equal(edited[outside], source_latents[0][outside])


def test_blending_stops_below_sigma_combine():
    walker, source_v, target_v, sigmas, source_latents, mask = _setup()
    every = [block.index for block in walker.blocks]
    asked = []

    def features(n):
        asked.append(n)
        return recomputed_flow_features(source_v, source_latents, sigmas, every)(n)

    flow_pfb_loop(target_v, source_latents[-1], source_latents, sigmas, features, mask, mask.latent,
                  blend_points=every, sigma_combine=sigmas[2], latent_blend=1.0)
    assert asked == [STEPS, STEPS - 1]  # the steps that start above σ[2]


def test_on_flux_the_loop_works_on_packed_tokens_with_the_mask_packed_alike():
    """Flux's latent is packed 2 × 2 latent pixels per token; the mask is packed the same way for latent blending,
    and blending every block again gives the source's velocity on the tokens outside the mask."""
    walker = FeatureTransformer(tiny_flux_transformer())
    generator = torch.Generator().manual_seed(0)
    source_text, target_text = torch.randn(2, 1, 6, 16, generator=generator)
    pooled = torch.randn(1, 8, generator=generator)
    grid = (LATENT // 2, LATENT // 2)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()

    def velocity_with(text):
        def velocity(x, sigma, on_block=None):
            return walker(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                          timestep=torch.tensor([sigma]), img_ids=img_ids, txt_ids=torch.zeros(6, 3),
                          on_block=on_block)
        return velocity

    source_v, target_v = velocity_with(source_text), velocity_with(target_text)
    sigmas = FlowGrid.from_scheduler_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, STEPS).sigmas
    with torch.no_grad():
        source_latents = integrate(lambda x, s: source_v(x, s), torch.randn(1, grid[0] * grid[1], 16, generator=generator),
                                   sigmas, "euler")
    latent = torch.zeros(1, 1, LATENT, LATENT)
    latent[..., 0:4, 2:8] = 1
    mask = EditMask(latent)
    packed = token_mask(mask, grid)
    assert packed.shape == (1, grid[0] * grid[1], 1) and packed[0, :, 0].tolist() == mask.at(grid).flatten().tolist()
    every = [block.index for block in walker.blocks]
    seen = {}
    edited = flow_pfb_loop(target_v, source_latents[-1], source_latents, sigmas,
                           recomputed_flow_features(source_v, source_latents, sigmas, every), mask, packed,
                           blend_points=every, latent_blend=-1.0, on_step=lambda n, v, x: seen.setdefault(n, v))
    outside = packed[0, :, 0] == 0
    for n, velocity in seen.items():
        with torch.no_grad():
            source = source_v(source_latents[n + 1], sigmas[n + 1])
        assert torch.equal(velocity[:, outside], source[:, outside])
        assert not torch.equal(velocity[:, ~outside], source[:, ~outside])
    assert torch.equal(edited[:, outside], source_latents[0][:, outside])


def test_once_the_layout_is_settled_the_latent_blend_keeps_the_band_outside_the_latent_core_as_the_sources():
    walker, source_v, target_v, sigmas, source_latents, mask = _setup()
    core = torch.zeros_like(mask.latent)
    core[..., 0:2, 2:6] = 1
    band = ((mask.latent == 1) & (core == 0)).expand(1, 4, LATENT, LATENT)
    runs = {settled: flow_pfb_loop(target_v, source_latents[-1], source_latents, sigmas, lambda n: {}, mask, mask.latent,
                                   settled_mask=core, latent_blend=-1.0, sigma_settled=settled)
            for settled in (0.0, 1.0)}
    assert torch.equal(runs[1.0][band], source_latents[0][band])  # settled throughout: the band is the photo's
    assert not torch.equal(runs[0.0][band], source_latents[0][band])  # never settled: the whole mask is regenerated
    plain = flow_pfb_loop(target_v, source_latents[-1], source_latents, sigmas, lambda n: {}, mask, mask.latent,
                          latent_blend=-1.0)
    assert torch.equal(runs[0.0], plain)
