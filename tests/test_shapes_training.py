"""Smoke test of the ShapesWorld training (``python -m pfbdiff.shapes.train``): every stage end to end, tiny.

The VAE, decoder and U-Net stages run for a few steps of batch 2 in a temporary folder, are resumed, stopped
by the ``--max-minutes`` deadline, quick-evaluated on a single caption and exported; the test checks the files that a long run is resumed and
shipped from (checkpoint keys, CSV columns, ``training.json``, the exported folder) and the min-SNR weights.
"""

import csv
import json
import shutil
import signal

import numpy as np
import pytest
import torch

UNET_CHECKPOINT_KEYS = ["unet", "text_encoder", "optimizer", "ema", "step", "warmup_from", "elapsed", "cpu_seconds",
                        "next_eval", "next_export"]
VAE_CHECKPOINT_KEYS = ["vae", "optimizer", "step", "elapsed"]


@pytest.fixture
def tiny_training(monkeypatch):
    """Few images for the VAE's scaling-factor and PSNR measurements; restores what ``main`` changes globally."""
    from pfbdiff.shapes import vae_stages

    monkeypatch.setattr(vae_stages, "MEASURE_BATCHES", 1)
    monkeypatch.setattr(vae_stages, "MEASURE_BATCH", 8)
    monkeypatch.setattr(vae_stages, "PSNR_IMAGES", 4)
    # main() sets the torch thread count and installs SIGTERM / SIGINT handlers (StopFlag).
    threads = torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    torch.set_num_threads(threads)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _csv(path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_every_stage_trains_resumes_and_exports(tmp_path, tiny_training):
    from safetensors.torch import load_file

    from pfbdiff.models.loading import load_components
    from pfbdiff.shapes.train import main

    out, export_dir = tmp_path / "run", tmp_path / "model"
    common = ["--out", str(out), "--log-every", "1", "--vae-batch", "2", "--batch", "2", "--eval-minutes", "0"]

    main([*common, "--stage", "vae", "--vae-steps", "2"])
    vae_info = json.loads((out / "vae" / "training.json").read_text())
    assert vae_info["steps"] == 2 and vae_info["scaling_factor"] > 0
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == vae_info["scaling_factor"]
    assert list(_checkpoint(out / "vae_checkpoint.pt")) == VAE_CHECKPOINT_KEYS
    assert _csv(out / "vae_log.csv")[0] == ["step", "elapsed_s", "loss", "l1", "l2", "kl", "train_psnr", "lr"]

    main([*common, "--stage", "decoder", "--decoder-steps", "2"])
    decoder = _checkpoint(out / "decoder_checkpoint.pt")
    assert list(decoder) == VAE_CHECKPOINT_KEYS and decoder["step"] == 2
    assert json.loads((out / "vae" / "training.json").read_text())["decoder_steps"] == 2
    assert _csv(out / "decoder_log.csv")[0] == ["step", "elapsed_s", "loss", "train_psnr"]

    main([*common, "--stage", "unet", "--unet-steps", "2"])
    assert _checkpoint(out / "unet_checkpoint.pt")["step"] == 2
    main([*common, "--stage", "unet", "--unet-steps", "3"])  # resumes at step 2 and trains one more
    resumed = _checkpoint(out / "unet_checkpoint.pt")
    assert list(resumed) == UNET_CHECKPOINT_KEYS and resumed["step"] == 3
    header, rows = _csv(out / "unet_log.csv")
    assert header == ["step", "elapsed_s", "cpu_s", "loss", "lr"] and [int(r["step"]) for r in rows] == [1, 2, 3]

    # An uninterrupted run on the same VAE reaches the same weights: the data and noise streams resume exactly,
    # and worker processes rendering the batches ahead hand them over in step order.
    straight = tmp_path / "straight"
    straight.mkdir()
    shutil.copytree(out / "vae", straight / "vae")
    main(["--out", str(straight), "--batch", "2", "--eval-minutes", "0", "--stage", "unet", "--unet-steps", "3",
          "--workers", "2"])
    uninterrupted = _checkpoint(straight / "unet_checkpoint.pt")
    for name in ("unet", "text_encoder"):
        assert all(torch.equal(value, uninterrupted[name][key]) for key, value in resumed[name].items())
    assert all(torch.equal(a, b) for a, b in zip(resumed["ema"], uninterrupted["ema"], strict=True))

    # A deadline already passed stops the session after one step, with a checkpoint.
    main([*common, "--stage", "unet", "--unet-steps", "10", "--max-minutes", "1e-9"])
    assert _checkpoint(out / "unet_checkpoint.pt")["step"] == 4

    # A quick evaluation on one caption (no two-object or train-split case) records the scores it has.
    main([*common, "--stage", "unet", "--unet-steps", "5", "--eval-minutes", "1e-9", "--eval-captions", "1",
          "--eval-steps", "1"])
    header, rows = _csv(out / "unet_eval.csv")
    assert [int(r["step"]) for r in rows] == [5] and {"single_full", "single_heldout_full"} <= set(header)
    assert not {"two_full", "single_train_full"} & set(header)

    main(["--out", str(out), "--export-only", "--export-dir", str(export_dir)])
    assert {p.name for p in export_dir.iterdir()} == {"model_index.json", "training.json", "pfbdiff.json", "scheduler",
                                                      "tokenizer", "text_encoder", "unet", "vae"}
    assert json.loads((export_dir / "pfbdiff.json").read_text()) == {"num_inference_steps": 20, "guidance_scale": 4.0}
    assert "single-object fully right" in (tmp_path / "model_card.md").read_text()
    info = json.loads((export_dir / "training.json").read_text())
    assert set(info) == {"family", "warm_start", "unet_steps", "unet_batch_size", "unet_seconds", "unet_cpu_seconds", "vae", "parameters",
                         "hardware", "quick_eval", "unet_phases", "exported"}
    assert [phase["steps"] for phase in info["unet_phases"]] == [[0, 5]]
    assert info["unet_steps"] == 5 and info["vae"]["decoder_steps"] == 2 and info["quick_eval"]["step"] == "5"
    weights = sorted(export_dir.glob("*/*.safetensors"))
    assert [w.parent.name for w in weights] == ["text_encoder", "unet", "vae"]
    for path in weights:
        assert {t.dtype for t in load_file(path).values() if t.is_floating_point()} == {torch.float16}

    components = load_components(export_dir, device="cpu", torch_dtype="float32")
    assert components["unet"].dtype == torch.float32
    assert components["vae"].config.scaling_factor == vae_info["scaling_factor"]
    ema = _checkpoint(out / "unet_checkpoint.pt")["ema"]
    assert torch.equal(next(components["unet"].parameters()), ema[0].half().float())  # the EMA weights, in fp16

    # Training can go on from the exported model: its weights (trained and EMA), step and clock carry over, the
    # fresh optimizer warms up again, and the object-weighted loss trains.
    continued = tmp_path / "continued"
    go_on = ["--out", str(continued), "--batch", "2", "--eval-minutes", "0", "--log-every", "1", "--stage", "unet",
             "--init-from", str(export_dir), "--object-weight", "2"]
    main([*go_on, "--unet-steps", "5"])  # the export's own step: nothing to train yet
    start = _checkpoint(continued / "unet_checkpoint.pt")
    assert start["step"] == 5 and start["warmup_from"] == 5 and start["elapsed"] == info["unet_seconds"]
    assert torch.equal(start["ema"][0], ema[0].half().float())
    assert torch.equal(next(iter(start["unet"].values())), ema[0].half().float())
    main([*go_on, "--unet-steps", "6"])
    assert _checkpoint(continued / "unet_checkpoint.pt")["step"] == 6
    assert _csv(continued / "unet_log.csv")[1][0]["lr"] == "2.50e-06"  # 5e-4, first of 200 warm-up steps
    main(["--out", str(continued), "--export-only", "--export-dir", str(export_dir)])
    phases = json.loads((export_dir / "training.json").read_text())["unet_phases"]
    assert [(phase["steps"], phase["object_weight"]) for phase in phases] == [([0, 5], 0.0), ([5, 6], 2.0)]
    assert "steps 5-6: batch 2; learning rate 0.0005" in (tmp_path / "model_card.md").read_text()


def test_an_sdxl_layout_model_starts_from_the_sd1_one_with_sdxls_additions_silent(tmp_path, tiny_training):
    """The SDXL-layout ShapesWorld model is warm-started from the bundled SD-1-layout one: at step 0 the second
    text encoder's columns and the pooled vector and size ids change nothing (their weights are zeros), and the
    attention the layouts share reads the first encoder with the SD-1 weights. Then it trains and exports an SDXL
    folder that the pipeline loads and edits with."""
    from diffusers import UNet2DConditionModel

    from pfbdiff.models.catalog import BUNDLED_SHAPES_MODEL
    from pfbdiff.pipeline import PFBDiffXLPipeline, load_pipeline
    from pfbdiff.shapes.train import main
    from pfbdiff.shapes.training_setup import POOLED_WIDTH, build_unet_stage, warm_start_from_sd1

    components = build_unet_stage(tmp_path, 0, "sdxl")
    warm_start_from_sd1(components, BUNDLED_SHAPES_MODEL)
    unet, width = components["unet"], components["text_encoder"].config.hidden_size
    generator = torch.Generator().manual_seed(0)
    latents, tokens = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, width + POOLED_WIDTH,
                                                                                   generator=generator)
    others = tokens.clone()
    others[..., width:] = torch.randn(1, 77, POOLED_WIDTH, generator=generator)

    def predict(tokens, pooled, size):
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]])}
        with torch.no_grad():
            return unet(latents, 500, encoder_hidden_states=tokens, added_cond_kwargs=added).sample

    first = predict(tokens, torch.randn(1, POOLED_WIDTH, generator=generator), 64.0)
    assert torch.equal(first, predict(others, torch.randn(1, POOLED_WIDTH, generator=generator), 1024.0))
    sd1 = UNet2DConditionModel.from_pretrained(BUNDLED_SHAPES_MODEL / "unet").float()
    shared, old = unet.down_blocks[1].attentions[0], sd1.down_blocks[1].attentions[0]
    key = shared.transformer_blocks[0].attn2.to_k.weight
    assert torch.equal(key[:, :width], old.transformer_blocks[0].attn2.to_k.weight) and not key[:, width:].any()
    assert torch.equal(shared.proj_in.weight, old.proj_in.weight.flatten(1))  # a 1 x 1 convolution, now linear

    out, export_dir = tmp_path / "run", tmp_path / "model_sdxl"
    main(["--out", str(out), "--stage", "unet", "--family", "sdxl", "--init-from", str(BUNDLED_SHAPES_MODEL),
          "--batch", "2", "--unet-steps", "2", "--eval-minutes", "0", "--export-dir", str(export_dir)])
    info = json.loads((export_dir / "training.json").read_text())
    assert info["family"] == "sdxl" and info["unet_steps"] == 2 and info["warm_start"]["unet_steps"] > 0
    assert "Warm start: from the SD-1-layout ShapesWorld model" in (tmp_path / "model_sdxl_card.md").read_text()
    pipe = load_pipeline(str(export_dir), quiet=True)
    assert isinstance(pipe, PFBDiffXLPipeline) and not pipe.config.force_zeros_for_empty_prompt
    photo = torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()
    mask = torch.zeros(64, 64).numpy()
    mask[16:48, 16:48] = 1
    result = pipe(photo, mask, "a red circle on a plain blue background", "a plain black background",
                  num_inference_steps=2, guidance_scale=4.0)
    assert result.images[0].size == (64, 64)

    # Training on from that export (a new learning-rate cycle) keeps saying which model the run first started from.
    continued = tmp_path / "continued"
    main(["--out", str(continued), "--stage", "unet", "--family", "sdxl", "--init-from", str(export_dir),
          "--batch", "2", "--unet-steps", "3", "--eval-minutes", "0", "--export-dir", str(export_dir)])
    again = json.loads((export_dir / "training.json").read_text())
    assert again["unet_steps"] == 3 and again["warm_start"] == info["warm_start"]
    assert "Warm start: from the SD-1-layout ShapesWorld model" in (tmp_path / "model_sdxl_card.md").read_text()


def test_an_sd3_layout_flow_model_trains_from_the_sd1_ones_text_encoder_and_exports_an_editable_folder(tmp_path):
    """The SD3-layout ShapesWorld model (a flow-matching transformer): its first CLIP starts as the bundled
    SD-1-layout model's text encoder (the positions it reads), it trains on the rectified-flow loss, resumes, and
    exports an SD3 folder that the pipeline loads as PFBDiffSD3Pipeline and edits with."""
    from transformers import CLIPTextModel

    from pfbdiff.flow_pipeline import PFBDiffSD3Pipeline
    from pfbdiff.models.catalog import BUNDLED_SHAPES_MODEL
    from pfbdiff.pipeline import load_pipeline
    from pfbdiff.shapes.train import main
    from pfbdiff.shapes.training_setup import FLOW_TEXT_LENGTH, build_unet_stage, warm_start_sd3_from_sd1

    components = build_unet_stage(tmp_path / "fresh", 0, "sd3")
    warm_start_sd3_from_sd1(components, BUNDLED_SHAPES_MODEL)
    sd1 = CLIPTextModel.from_pretrained(BUNDLED_SHAPES_MODEL / "text_encoder").float()
    ids = components["tokenizer"](["a red circle on a plain blue background"], padding="max_length",
                                  max_length=FLOW_TEXT_LENGTH, return_tensors="pt").input_ids
    with torch.no_grad():  # causal attention: the first 32 positions see what they saw in the 77-token model
        warm = components["text_encoder"](ids, output_hidden_states=True).hidden_states[-1]
        old = sd1(ids, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(warm, old, atol=1e-5)

    out, export_dir = tmp_path / "run", tmp_path / "model_sd3"
    args = ["--out", str(out), "--stage", "unet", "--family", "sd3", "--init-from", str(BUNDLED_SHAPES_MODEL),
            "--batch", "2", "--eval-minutes", "0", "--export-dir", str(export_dir)]
    main([*args, "--unet-steps", "1"])
    main([*args, "--unet-steps", "2"])  # resumes from the checkpoint
    info = json.loads((export_dir / "training.json").read_text())
    assert info["family"] == "sd3" and info["unet_steps"] == 2 and info["parameters"]["transformer"] > 1e6
    card = (tmp_path / "model_sd3_card.md").read_text()
    assert "SD3 layout" in card and "rectified flow" in card and "warm_start_sd3_from_sd1" in card
    pipe = load_pipeline(str(export_dir), quiet=True)
    assert isinstance(pipe, PFBDiffSD3Pipeline) and pipe.recommended_settings["guidance_scale"] == 4.0
    photo = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1
    result = pipe(photo, mask, "a red circle on a plain blue background", "a plain black background",
                  num_inference_steps=2)
    kept = np.asarray(result.masks[0]) == 0  # outside the region the edit reports, the photo's own pixels
    assert kept.any() and np.array_equal(np.asarray(result.images[0])[kept], photo[kept])


def test_the_flow_matching_loss_is_zero_for_the_exact_velocity_and_weights_objects():
    from pfbdiff.engine.conditioning import Conditioning
    from pfbdiff.shapes.unet_stage import flow_matching_loss

    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)

    class Exact(torch.nn.Module):  # knows the pair: answers ε − x₀ whatever σ it is shown at
        def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
            return type("Out", (), {"sample": noise - latents})()

    weights = torch.ones(2, 1, 4, 4)
    conditioning = Conditioning(torch.zeros(2, 3, 8), torch.zeros(2, 8))
    assert flow_matching_loss(Exact(), latents, noise, conditioning, weights,
                              torch.Generator().manual_seed(1)).item() == 0


def test_snr_weights_keep_the_terminal_step_and_cap_the_clean_ones():
    from diffusers import DDIMScheduler

    from pfbdiff.shapes.training_setup import scheduler_config
    from pfbdiff.shapes.unet_stage import snr_weights

    scheduler = DDIMScheduler.from_config(scheduler_config())
    alphas_cumprod = scheduler.alphas_cumprod
    timesteps = torch.arange(len(alphas_cumprod))
    weights = snr_weights(alphas_cumprod, timesteps, gamma=5.0)
    assert alphas_cumprod[-1] == 0  # zero terminal SNR
    assert weights[-1] == 1
    assert torch.all(weights > 0) and torch.all(weights <= 1)
    assert weights[0] < 0.01  # the nearly clean steps are capped


def test_object_loss_weights_count_the_object_share_of_each_latent_pixel():
    from pfbdiff.shapes.unet_stage import object_loss_weights

    objects = torch.zeros(1, 1, 64, 64)
    objects[..., 8:12, 8:12] = 1  # one latent pixel (4 x 4 image pixels) fully on an object
    objects[..., 20:22, 20:24] = 1  # half of another
    weights = object_loss_weights(objects, 16, object_weight=3.0)
    assert weights.shape == (1, 1, 16, 16)
    assert weights[0, 0, 2, 2] == 4.0 and weights[0, 0, 5, 5] == 2.5 and (weights == 1.0).sum() == 16 * 16 - 2
