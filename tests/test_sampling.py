"""The DDIM grid and update (docs/method.md §2, §10 property 11): parity with diffusers, every prediction type."""

import pytest
import torch
from diffusers import DDIMScheduler

from pfbdiff.engine.sampling import DDIMGrid, ddim_move, ddim_step, split_prediction
from pfbdiff.errors import PFBDiffError
from pfbdiff.models.toy_models import sd_scheduler_config


def test_grid_of_sd_schedule_is_981_down_to_1_with_alpha_zero_last():
    grid = DDIMGrid.from_scheduler_config(sd_scheduler_config(), 50)
    assert grid.timesteps == tuple(range(1, 1000, 20))
    assert grid.alpha_prev(0) == float(grid.alphas_cumprod[0])  # set_alpha_to_one=False
    assert grid.alpha_prev(10) == grid.alpha(grid.timesteps[9])


def test_inversion_targets_are_next_grid_point_then_clamped_to_999():
    grid = DDIMGrid.from_scheduler_config(sd_scheduler_config(), 50)
    assert [grid.inversion_target(k) for k in (0, 1, 48)] == [21, 41, 981]
    assert grid.inversion_target(49) == 999


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_matches_diffusers_ddim_scheduler(prediction_type):
    config = dict(sd_scheduler_config(), prediction_type=prediction_type)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(10)
    grid = DDIMGrid.from_scheduler_config(config, 10)
    torch.manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for n, t in reversed(list(enumerate(grid.timesteps))):
        ours = ddim_step(out, x, grid.alpha(t), grid.alpha_prev(n), prediction_type)
        theirs = scheduler.step(out, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_split_prediction_is_consistent_with_placing_back(prediction_type):
    torch.manual_seed(0)
    x, out, alpha = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), 0.3
    x0, eps = split_prediction(out, x, alpha, prediction_type)
    torch.testing.assert_close(ddim_move(x0, eps, alpha), x, rtol=1e-5, atol=1e-5)


def test_zero_terminal_snr_v_prediction_has_no_division_by_zero():
    config = dict(sd_scheduler_config(), prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    grid = DDIMGrid.from_scheduler_config(config, 10)
    assert grid.timesteps[-1] == 999 and grid.alpha(999) == 0.0
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.isfinite(ddim_step(v, x, grid.alpha(999), grid.alpha_prev(9), "v_prediction")).all()
    assert torch.isfinite(ddim_step(v, x, grid.alpha(grid.timesteps[-2]), grid.alpha(999), "v_prediction")).all()


def test_zero_terminal_snr_with_epsilon_prediction_is_a_clear_error():
    config = dict(sd_scheduler_config(), rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.raises(PFBDiffError, match="zero terminal SNR"):
        DDIMGrid.from_scheduler_config(config, 10)


def test_steps_below_one_are_refused():
    with pytest.raises(PFBDiffError, match="steps"):
        DDIMGrid.from_scheduler_config(sd_scheduler_config(), 0)
