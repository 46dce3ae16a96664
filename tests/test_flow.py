"""Rectified flow (engine/flow.py): the noise-level grid of flow-matching schedulers, the velocity split, and the
inversion / sampling solvers, each converging at the order it claims with the velocity evaluations it claims."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pfbdiff.engine import flow
from pfbdiff.errors import PFBDiffError

SD3_CONFIG = FlowMatchEulerDiscreteScheduler(shift=3.0).config
FLUX_CONFIG = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                              base_image_seq_len=256, max_image_seq_len=4096).config


def test_the_grid_runs_from_the_clean_latent_to_noise_shifted_towards_noise():
    grid = flow.FlowGrid.from_scheduler_config(SD3_CONFIG, 8)
    assert grid.num_steps == 8 and grid.sigmas[0] == 0 and grid.sigmas[-1] == pytest.approx(1)
    assert all(a < b for a, b in zip(grid.sigmas, grid.sigmas[1:]))
    assert grid.sigmas[4] > 0.6  # unshifted it would be 0.43: SD3's shift 3 spends the steps at high noise
    assert grid.timestep(grid.sigmas[-1]) == pytest.approx(1000)


def test_sd3s_grid_is_the_one_diffusers_sd3_pipeline_samples_on():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG)
    scheduler.set_timesteps(8)  # what StableDiffusion3Pipeline asks its scheduler for
    grid = flow.FlowGrid.from_scheduler_config(SD3_CONFIG, 8)
    assert list(grid.sigmas) == [float(s) for s in reversed(scheduler.sigmas)]


def test_flux_shifts_more_for_larger_images_and_needs_their_size():
    small, large = (flow.FlowGrid.from_scheduler_config(FLUX_CONFIG, 4, image_seq_len=n) for n in (256, 4096))
    assert all(b > a for a, b in zip(small.sigmas[1:-1], large.sigmas[1:-1]))
    with pytest.raises(PFBDiffError, match="image_seq_len"):
        flow.FlowGrid.from_scheduler_config(FLUX_CONFIG, 4)


def test_the_velocity_splits_into_the_clean_latent_and_the_noise_it_points_between():
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64).unbind(0)
    for sigma in (0.0, 0.3, 1.0):
        clean, noise = flow.split_velocity((1 - sigma) * x0 + sigma * eps, eps - x0, sigma)
        torch.testing.assert_close(clean, x0)
        torch.testing.assert_close(noise, eps)


def _field():
    """dx/dσ = −cos(σ) x, whose exact flow is x(σ) = x(0) exp(−sin σ); counts its evaluations."""
    calls = []

    def velocity(x, sigma):
        calls.append(sigma)
        return -math.cos(sigma) * x

    return velocity, calls


ORDERS = {"euler": (1, lambda n: n), "midpoint": (2, lambda n: 2 * n), "fireflow": (2, lambda n: n + 1)}


@pytest.mark.parametrize("solver", list(ORDERS))
def test_each_solver_converges_at_its_order_with_its_velocity_evaluations(solver):
    order, evaluations = ORDERS[solver]
    x0 = torch.ones(3, dtype=torch.float64)
    errors = []
    for n in (16, 32, 64):
        velocity, calls = _field()
        sigmas = [k / n for k in range(n + 1)]
        inverted = flow.integrate(velocity, x0, sigmas, solver)
        assert len(calls) == evaluations(n) and len(inverted) == n + 1
        errors.append(float((inverted[-1] - x0 * math.exp(-math.sin(1.0))).abs().max()))
    for coarse, fine in zip(errors, errors[1:]):
        assert math.log2(coarse / fine) == pytest.approx(order, abs=0.15)


@pytest.mark.parametrize("solver", list(ORDERS))
def test_inverting_then_sampling_gives_the_latent_back_with_an_error_falling_at_least_at_the_solvers_order(solver):
    order, _ = ORDERS[solver]
    x0 = torch.linspace(-1, 1, 5, dtype=torch.float64)
    errors = []
    for n in (16, 32, 64):
        velocity, _ = _field()
        sigmas = [k / n for k in range(n + 1)]
        noise = flow.integrate(velocity, x0, sigmas, solver)[-1]
        errors.append(float((flow.integrate(velocity, noise, sigmas[::-1], solver)[-1] - x0).abs().max()))
    # at least the solver's order: the two directions' leading errors partly cancel (3rd order for the 2nd-order ones)
    assert errors[-1] < errors[0] and math.log2(errors[1] / errors[2]) >= order - 0.2


def test_an_unknown_solver_is_named():
    with pytest.raises(PFBDiffError, match="solver must be one of euler, midpoint, fireflow"):
        flow.integrate(lambda x, s: x, torch.zeros(1), [0.0, 1.0], "heun")


def test_on_a_tiny_sd3_transformer_the_round_trip_error_falls_with_the_steps_and_fireflow_beats_euler():
    """A random-weight SD3-shaped transformer (2 joint blocks) as the velocity: measured, not assumed."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                  pooled_projection_dim=64, out_channels=4).eval().double()
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(1, 7, 32, generator=generator, dtype=torch.float64)
    pooled = torch.randn(1, 64, generator=generator, dtype=torch.float64)
    x0 = torch.randn(1, 4, 16, 16, generator=generator, dtype=torch.float64)

    @torch.no_grad()
    def velocity(x, sigma):
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=torch.tensor([sigma * 1000.0], dtype=torch.float64)).sample

    def round_trip(solver, n):
        sigmas = [k / n for k in range(n + 1)]
        noise = flow.integrate(velocity, x0, sigmas, solver)[-1]
        return float((flow.integrate(velocity, noise, sigmas[::-1], solver)[-1] - x0).pow(2).mean().sqrt())

    for solver in ORDERS:
        errors = [round_trip(solver, n) for n in (4, 8, 16)]
        assert errors[0] > errors[1] > errors[2], (solver, errors)
    assert round_trip("fireflow", 16) < round_trip("euler", 16) / 10  # 17 velocities against 16
