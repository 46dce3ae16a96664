"""Train the bundled ShapesWorld text-to-image model: a small Stable-Diffusion-shaped latent diffusion model.

Two stages, each resumable (rerun the same command after an interruption and it carries on from the last
checkpoint, bit for bit in its data and noise streams):

1. ``--stage vae``: an ``AutoencoderKL`` with downscale factor 4 (64 x 64 x 3 images to 16 x 16 x 4
   latents), trained with L1 + L2 + an edge (image-gradient) L1 loss and a small KL term. At the end the
   latent standard deviation is measured and ``scaling_factor`` set so that scaled latents have unit std.
2. ``--stage unet``: a ``UNet2DConditionModel`` (cross-attention at the 16 x 16 and 8 x 8 levels and in the
   mid block) and a ``CLIPTextModel`` trained from scratch together, on v-prediction with a zero-terminal-SNR
   ``DDIMScheduler`` ("trailing" timesteps), min-SNR-gamma loss weights, AdamW with warm-up, EMA weights,
   and 10 % empty captions for classifier-free guidance.

``--stage all`` runs both. Training scenes are rendered on the fly from the ``"train"`` split (held-out
combinations never appear). Every few minutes the state goes to ``<out>/<stage>_checkpoint.pt``; a quick oracle
evaluation of the EMA model is logged to ``<out>/unet_eval.csv``; with ``--export-dir`` the EMA model is
exported there as a diffusers Stable Diffusion folder (fp16 safetensors) together with a model card.

Usage::

    python -m pfbdiff.shapes.train --out runs/shapes --stage all --export-dir src/pfbdiff/shapes/model
    python -m pfbdiff.shapes.train --out runs/shapes --export-only --export-dir src/pfbdiff/shapes/model
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pfbdiff.shapes.world import HELD_OUT_BACKGROUNDS, HELD_OUT_OBJECTS, VOCABULARY, caption, render, sample_scene

STAGE_CODES = {"vae": 1, "unet": 2, "decoder": 3}
EMPTY_CAPTION = ""

# ------------------------------------------------------------------------------------------------ model configs


def vae_config() -> dict:
    """AutoencoderKL: 64 x 64 x 3 <-> 16 x 16 x 4 (three levels, so a downscale factor of 4)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (24, 48, 64),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 1.0,  # measured after training
    }


def unet_config(cross_attention_dim: int = 128) -> dict:
    """UNet2DConditionModel on 16 x 16 x 4 latents; cross-attention at 16 x 16, 8 x 8 and in the 4 x 4 mid block.

    ``attention_head_dim`` is the number of heads here (the SD 1.x naming quirk of diffusers).
    """
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (64, 128, 128),
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "attention_head_dim": 4,
        "cross_attention_dim": cross_attention_dim,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def text_encoder_config(tokenizer, hidden_size: int = 128, layers: int = 3):
    """A small CLIP text transformer whose vocabulary and special token ids match ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        projection_dim=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def scheduler_config() -> dict:
    """DDIM with SD's beta range, rescaled to zero terminal SNR, v-prediction and trailing timesteps."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ data


def training_batch(seed: int, stage: str, step: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """Rendered train-split scenes (N x 3 x 64 x 64 in [-1, 1]) and their captions, fixed by (seed, stage, step)."""
    rng = np.random.default_rng([seed, STAGE_CODES[stage], step])
    scenes = [sample_scene(rng, split="train") for _ in range(batch_size)]
    images = np.stack([render(scene).image for scene in scenes])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return tensor, [caption(scene) for scene in scenes]


# ------------------------------------------------------------------------------------------------ helpers


class StopFlag:
    """Set by SIGTERM / SIGINT so the loops can checkpoint before exiting."""

    def __init__(self) -> None:
        self.stop = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        print(f"signal {signum}: checkpointing and stopping", flush=True)
        self.stop = True


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def append_csv(path: Path, row: dict) -> None:
    """Append a row; a file whose header lacks some of the row's columns is rewritten with them added."""
    fields = list(row)
    if path.exists():
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if header and not set(fields) <= set(header):
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            header += [f for f in fields if f not in header]
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=header)
                writer.writeheader()
                writer.writerows(rows)
        fields = header or fields
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)


def lr_at(step: int, base: float, warmup: int, total: int | None = None, floor: float = 0.1) -> float:
    """Linear warm-up, then constant (``total`` None) or cosine decay to ``floor * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    if total is None:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def hardware() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch CPU thread(s)"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ stage 1: VAE


def image_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 distance between the horizontal and vertical finite differences of two image batches (edge loss)."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def train_vae(args, stop: StopFlag) -> None:
    from diffusers import AutoencoderKL

    out = Path(args.out)
    final_dir = out / "vae"
    if (final_dir / "config.json").exists():
        log(f"VAE already trained: {final_dir}")
        return
    ckpt_path = out / "vae_checkpoint.pt"
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        log(f"VAE: resumed at step {step} ({elapsed / 60:.1f} min done)")
    else:
        log(f"VAE: {count_parameters(vae) / 1e6:.3f}M parameters, {args.vae_steps} steps of batch {args.vae_batch}")
    vae.train()

    def save() -> None:
        atomic_save({"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "elapsed": elapsed}, ckpt_path)

    session_start = time.time()
    last_save = last_log = time.time()
    window: list[float] = []
    while step < args.vae_steps and not stop.stop:
        tick = time.time()
        images, _ = training_batch(args.seed, "vae", step, args.vae_batch)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_lr, 50, args.vae_steps)
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        l1 = (recon - images).abs().mean()
        l2 = F.mse_loss(recon, images)
        edge = image_gradient_l1(recon, images)
        kl = posterior.kl().mean() / latents[0].numel()
        loss = l1 + l2 + args.edge_weight * edge + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        elapsed += time.time() - tick
        psnr = 10 * math.log10(4.0 / max(l2.item(), 1e-12))  # images span 2 units in [-1, 1]
        window.append(psnr)
        if step % args.log_every == 0 or step == args.vae_steps:
            append_csv(out / "vae_log.csv", {"step": step, "elapsed_s": round(elapsed, 1), "loss": round(loss.item(), 5),
                                             "l1": round(l1.item(), 5), "l2": round(l2.item(), 6),
                                             "kl": round(kl.item(), 4), "train_psnr": round(float(np.mean(window)), 2),
                                             "lr": f"{optimizer.param_groups[0]['lr']:.2e}"})
            if time.time() - last_log > 60:
                log(f"VAE step {step}: loss {loss.item():.4f}, train PSNR {np.mean(window):.2f} dB, "
                    f"{elapsed / step:.2f} s/step")
                last_log = time.time()
            window = []
        if time.time() - last_save > args.checkpoint_minutes * 60:
            save()
            last_save = time.time()
        if args.max_minutes and time.time() - session_start > args.max_minutes * 60:
            stop.stop = True
    save()
    if step < args.vae_steps:
        log(f"VAE: stopped at step {step}; rerun the same command to resume")
        return
    finish_vae(vae, final_dir, args, elapsed, step)


@torch.no_grad()
def finish_vae(vae, final_dir: Path, args, elapsed: float, step: int) -> None:
    """Measure the latent std, set ``scaling_factor`` and save the VAE (fp32) with its PSNR."""
    from pfbdiff.shapes.evaluate import reconstruction_psnr

    vae.eval()
    latents = []
    for index in range(4):
        images, _ = training_batch(args.seed + 1, "vae", index, 64)
        latents.append(vae.encode(images).latent_dist.mean)
    latents = torch.cat(latents)
    std = latents.std().item()
    scaling = round(1.0 / std, 5)
    vae.register_to_config(scaling_factor=scaling)
    psnr = reconstruction_psnr(vae, 256)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    info = {"steps": step, "batch_size": args.vae_batch, "seconds": round(elapsed, 1), "latent_mean": latents.mean().item(),
            "latent_std": std, "scaling_factor": scaling, **psnr}
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, final_dir)
    log(f"VAE done: {info}")


def train_decoder(args, stop: StopFlag) -> None:
    """Fine-tune the VAE decoder alone (the encoder, hence the latent space and scaling factor, stay fixed).

    Can run before, after or between U-Net sessions: the U-Net only ever sees encoder outputs. Updates
    ``<out>/vae`` in place when done (its ``training.json`` records the extra steps and the new PSNR).
    """
    out = Path(args.out)
    final_dir = out / "vae"
    info = json.loads((final_dir / "training.json").read_text())
    if info.get("decoder_steps", 0) >= args.decoder_steps:
        log(f"decoder already fine-tuned for {info['decoder_steps']} steps")
        return
    vae = load_vae(out)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.decoder_lr, betas=(0.9, 0.99), weight_decay=0.0)
    ckpt_path = out / "decoder_checkpoint.pt"
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        log(f"decoder: resumed at step {step}")
    vae.decoder.train()

    def save() -> None:
        atomic_save({"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "elapsed": elapsed}, ckpt_path)

    session_start = last_save = last_log = time.time()
    while step < args.decoder_steps and not stop.stop:
        tick = time.time()
        images, _ = training_batch(args.seed, "decoder", step, args.vae_batch)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 900_000_000 + step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.decoder_lr, 20, args.decoder_steps)
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        l2 = F.mse_loss(recon, images)
        loss = (recon - images).abs().mean() + l2 + args.edge_weight * image_gradient_l1(recon, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        elapsed += time.time() - tick
        if step % args.log_every == 0:
            append_csv(out / "decoder_log.csv", {"step": step, "elapsed_s": round(elapsed, 1),
                                                 "loss": round(loss.item(), 5),
                                                 "train_psnr": round(10 * math.log10(4.0 / max(l2.item(), 1e-12)), 2)})
            if time.time() - last_log > 60:
                log(f"decoder step {step}: loss {loss.item():.4f} ({elapsed / step:.2f} s/step)")
                last_log = time.time()
        if time.time() - last_save > args.checkpoint_minutes * 60:
            save()
            last_save = time.time()
        if args.max_minutes and time.time() - session_start > args.max_minutes * 60:
            stop.stop = True
    save()
    if step < args.decoder_steps:
        log(f"decoder: stopped at step {step}; rerun the same command to resume")
        return
    from pfbdiff.shapes.evaluate import reconstruction_psnr

    vae.eval().requires_grad_(False)
    info.update({"decoder_steps": step, "decoder_seconds": round(elapsed, 1), **reconstruction_psnr(vae, 256)})
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    old = final_dir.with_name(final_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    shutil.rmtree(old, ignore_errors=True)
    log(f"decoder fine-tuned: {info}")


# ------------------------------------------------------------------------------------------------ stage 2: UNet


def build_unet_stage(out: Path, seed: int):
    """Tokenizer, text encoder, UNet and scheduler of a fresh model (weights seeded)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from pfbdiff.toy_models import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(VOCABULARY, out / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer))
    unet = UNet2DConditionModel(**unet_config(text_encoder.config.hidden_size))
    scheduler = DDIMScheduler.from_config(scheduler_config())
    return tokenizer, text_encoder, unet, scheduler


def load_vae(out: Path):
    from diffusers import AutoencoderKL

    folder = out / "vae"
    if not (folder / "config.json").exists():
        raise SystemExit(f"no trained VAE in {folder}: run --stage vae first")
    return AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)


class EMA:
    """Exponential moving average of parameters, decay ``min(max_decay, (1 + step) / (10 + step))``."""

    def __init__(self, modules: list[torch.nn.Module], max_decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.max_decay = max_decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.max_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)



def snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for a v-prediction loss.

    The v target's signal-to-noise ratio is ``snr + 1`` (v mixes the noise and the image), so the
    weight ``min(snr + 1, gamma) / (snr + 1)`` is the min-SNR rule of Hang et al. (2023) expressed for v: it
    caps the weight of the nearly clean steps. Unlike ``min(snr, gamma) / (snr + 1)``, it stays 1 at the zero-SNR
    terminal step, whose prediction (the image mean from pure noise) is exactly what fixes colours and layout.
    """
    abar = alphas_cumprod[timesteps]
    snr_v = abar / (1 - abar).clamp_min(1e-8) + 1
    return snr_v.clamp(max=gamma) / snr_v


def train_unet(args, stop: StopFlag) -> None:
    out = Path(args.out)
    vae = load_vae(out)
    tokenizer, text_encoder, unet, scheduler = build_unet_stage(out, args.seed)
    modules = [unet, text_encoder]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMA(modules, args.ema_decay)
    ckpt_path = out / "unet_checkpoint.pt"
    step, elapsed, next_eval, next_export = 0, 0.0, args.eval_minutes * 60, args.export_minutes * 60
    cpu_seconds = 0.0  # CPU time of this process's training steps: robust to other load and to pauses
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for shadow, value in zip(ema.shadow, state["ema"], strict=True):
                shadow.copy_(value)
        step, elapsed, cpu_seconds = state["step"], state["elapsed"], state.get("cpu_seconds", 0.0)
        next_eval, next_export = state.get("next_eval", next_eval), state.get("next_export", next_export)
        log(f"UNet: resumed at step {step} ({elapsed / 60:.1f} min done)")
    else:
        log(f"UNet: {count_parameters(unet) / 1e6:.3f}M parameters, text encoder "
            f"{count_parameters(text_encoder) / 1e6:.3f}M, VAE {count_parameters(vae) / 1e6:.3f}M; batch "
            f"{args.batch}, lr {args.lr}")
    unet.train()
    text_encoder.train()
    scaling = vae.config.scaling_factor
    alphas_cumprod = scheduler.alphas_cumprod
    uncond_rate = args.uncond_rate

    def save() -> None:
        atomic_save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                     "optimizer": optimizer.state_dict(), "ema": ema.shadow, "step": step, "elapsed": elapsed,
                     "cpu_seconds": cpu_seconds, "next_eval": next_eval, "next_export": next_export}, ckpt_path)

    session_start = time.time()
    last_save = last_log = time.time()
    losses: list[float] = []
    while (args.unet_steps is None or step < args.unet_steps) and not stop.stop:
        tick, cpu_tick = time.time(), time.process_time()
        images, captions = training_batch(args.seed, "unet", step, args.batch)
        rng = np.random.default_rng([args.seed, 99, step])
        captions = [EMPTY_CAPTION if rng.random() < uncond_rate else c for c in captions]
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 500_000_000 + step)
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            latents = latents * scaling
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup)
        context = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
        loss = (snr_weights(alphas_cumprod, timesteps, args.snr_gamma) * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        ema.update(step)
        elapsed += time.time() - tick
        cpu_seconds += time.process_time() - cpu_tick
        losses.append(loss.item())
        if step % args.log_every == 0:
            append_csv(out / "unet_log.csv", {"step": step, "elapsed_s": round(elapsed, 1),
                                              "cpu_s": round(cpu_seconds, 1),
                                              "loss": round(float(np.mean(losses)), 5),
                                              "lr": f"{optimizer.param_groups[0]['lr']:.2e}"})
            if time.time() - last_log > 120:
                log(f"UNet step {step}: loss {np.mean(losses):.4f} ({elapsed / step:.2f} s/step overall)")
                last_log = time.time()
            losses = []
        if time.time() - last_save > args.checkpoint_minutes * 60:
            save()
            last_save = time.time()
        if args.eval_minutes and elapsed >= next_eval:
            quick_eval(args, out, ema, vae, tokenizer, step, elapsed)
            next_eval = elapsed + args.eval_minutes * 60
        if args.export_dir and args.export_minutes and elapsed >= next_export:
            save()
            export_model(out, Path(args.export_dir), args)
            next_export = elapsed + args.export_minutes * 60
        if args.max_minutes and time.time() - session_start > args.max_minutes * 60:
            stop.stop = True
    save()
    log(f"UNet: stopped at step {step} ({elapsed / 60:.1f} min of training)")
    if args.export_dir:
        export_model(out, Path(args.export_dir), args)


def ema_components(out: Path, seed: int, ema_shadow=None) -> dict:
    """Components with the EMA weights of the checkpoint (or of ``ema_shadow``), in eval mode, fp32."""
    tokenizer, text_encoder, unet, scheduler = build_unet_stage(out, seed)
    if ema_shadow is None:
        ema_shadow = torch.load(out / "unet_checkpoint.pt", map_location="cpu", weights_only=True)["ema"]
    targets = [p for m in (unet, text_encoder) for p in m.parameters()]
    with torch.no_grad():
        for target, value in zip(targets, ema_shadow, strict=True):
            target.copy_(value)
    vae = load_vae(out)
    for module in (unet, text_encoder, vae):
        module.eval().requires_grad_(False)
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}


def quick_eval(args, out: Path, ema: EMA, vae, tokenizer, step: int, elapsed: float) -> dict:
    """Oracle scores of the EMA model on a few captions with few DDIM steps, appended to ``unet_eval.csv``."""
    from pfbdiff.shapes.evaluate import generation_accuracy

    tick = time.time()
    components = ema_components(out, args.seed, ema.shadow)
    result = generation_accuracy(components, args.eval_captions, steps=args.eval_steps, guidance=args.guidance)
    row = {"step": step, "elapsed_s": round(elapsed, 1), "captions": args.eval_captions, "ddim_steps": args.eval_steps}
    for key in ("single_full", "two_full", "all_background", "all_pattern", "all_count", "all_colours", "all_shapes",
                "single_objects", "two_objects", "single_heldout_full", "single_train_full"):
        row[key] = round(result[key], 3)
    row["eval_seconds"] = round(time.time() - tick, 1)
    append_csv(out / "unet_eval.csv", row)
    log(f"quick eval at step {step}: {row}")
    return row


# ------------------------------------------------------------------------------------------------ export


def export_model(out: Path, export_dir: Path, args=None, dtype: torch.dtype = torch.float16) -> Path:
    """Write the EMA model as a diffusers StableDiffusionPipeline folder (safetensors, ``dtype`` on disk).

    The weights are stored in ``dtype`` but every config keeps fp32 as the default dtype, so a plain
    ``StableDiffusionPipeline.from_pretrained(folder)`` loads everything in fp32 on the CPU.
    """
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    seed = args.seed if args is not None else 0
    components = ema_components(out, seed)
    pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    for weights in tmp.glob("*/*.safetensors"):
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    state = torch.load(out / "unet_checkpoint.pt", map_location="cpu", weights_only=True)
    vae_info = json.loads((out / "vae" / "training.json").read_text())
    info = {
        "unet_steps": state["step"],
        "unet_batch_size": args.batch if args is not None else None,
        "unet_seconds": round(state["elapsed"], 1),
        "unet_cpu_seconds": round(state.get("cpu_seconds", 0.0), 1) or None,
        "vae": vae_info,
        "parameters": {name: count_parameters(components[name]) for name in ("unet", "text_encoder", "vae")},
        "hardware": hardware(),
        "quick_eval": _last_row(out / "unet_eval.csv", max_step=state["step"]),
        "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    previous = export_dir / "training.json"
    if previous.exists():  # keep a full evaluation if it was made on these very weights
        old = json.loads(previous.read_text())
        if old.get("unet_steps") == info["unet_steps"] and "evaluation" in old:
            info["evaluation"] = old["evaluation"]
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    old_dir = export_dir.with_name(export_dir.name + ".old")
    shutil.rmtree(old_dir, ignore_errors=True)
    if export_dir.exists():
        os.replace(export_dir, old_dir)
    os.replace(tmp, export_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    write_model_card(export_dir)
    log(f"exported EMA model at step {state['step']} to {export_dir} ({folder_size(export_dir) / 1e6:.1f} MB)")
    return export_dir


def _last_row(path: Path, max_step: int | None = None) -> dict | None:
    """The last CSV row (with ``step`` at most ``max_step``, if given), or None."""
    if not path.exists():
        return None
    with path.open() as handle:
        rows = [r for r in csv.DictReader(handle) if max_step is None or int(r["step"]) <= max_step]
    return rows[-1] if rows else None


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def write_model_card(model_dir: Path, card_path: Path | None = None) -> Path:
    """Write ``model_card.md`` (next to the model folder unless ``card_path``) from ``<model_dir>/training.json``."""
    model_dir = Path(model_dir)
    info = json.loads((model_dir / "training.json").read_text())
    card_path = Path(card_path) if card_path else model_dir.parent / "model_card.md"
    vae = info["vae"]
    params = info["parameters"]
    lines = [
        "# ShapesWorld text-to-image model (bundled with pfbdiff)",
        "",
        "A small latent diffusion model with exactly Stable Diffusion's component types (`AutoencoderKL`, "
        "`CLIPTextModel` + `CLIPTokenizer`, `UNet2DConditionModel`, `DDIMScheduler`), trained from scratch on "
        "CPU so that the PFB-Diff editing code can be run and scored without downloading Stable Diffusion. "
        "Folder: `src/pfbdiff/shapes/model/` (diffusers layout, fp16 safetensors on disk, configs default to fp32).",
        "",
        "## Data",
        "",
        "ShapesWorld (`pfbdiff.shapes.world`): 64 x 64 RGB scenes of one or two solid shapes (circle, square, "
        "triangle; 6 colours) on a plain, striped or checkered background of another colour, with captions such "
        "as `a red circle and a green square on a plain yellow background`. Scenes are rendered on the fly from "
        "the `train` split, which never contains the held-out combinations "
        f"(objects {', '.join(' '.join(p) for p in HELD_OUT_OBJECTS)}; backgrounds "
        f"{', '.join(' '.join(p) for p in HELD_OUT_BACKGROUNDS)}).",
        "",
        "## Components",
        "",
        f"* VAE: `AutoencoderKL`, block_out_channels {list(vae_config()['block_out_channels'])}, downscale factor 4 "
        f"(64 x 64 x 3 -> 16 x 16 x 4), {params['vae'] / 1e6:.2f}M parameters, scaling_factor "
        f"{vae['scaling_factor']} (1 / measured latent std).",
        f"* Text encoder: `CLIPTextModel`, hidden 128, 3 layers, 4 heads, {params['text_encoder'] / 1e6:.2f}M "
        "parameters; tokenizer: CLIP BPE in which every ShapesWorld word is one token, max length 77.",
        f"* U-Net: `UNet2DConditionModel`, block_out_channels {list(unet_config()['block_out_channels'])}, "
        "CrossAttnDownBlock2D x2 + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x2, "
        f"layers_per_block {unet_config()['layers_per_block']}, {params['unet'] / 1e6:.2f}M parameters.",
        "* Scheduler: `DDIMScheduler`, SD's scaled-linear betas rescaled to zero terminal SNR, v-prediction, "
        "trailing timestep spacing.",
        "",
        "## Training",
        "",
        f"* VAE: {vae['steps']} steps of batch {vae['batch_size']} ({vae['seconds'] / 60:.1f} min); L1 + L2 + "
        "image-gradient L1 + 1e-5 KL; AdamW, cosine decay.",
        f"* U-Net + text encoder (jointly, from scratch): {info['unet_steps']} steps of batch "
        f"{info['unet_batch_size']} ({info['unet_seconds'] / 60:.1f} min); v-prediction, min-SNR-5 weights "
        "(for v: min(snr + 1, 5) / (snr + 1)), AdamW with warm-up, 10 % empty captions, EMA weights exported.",
        f"* Hardware: {info['hardware']}. Script: `python -m pfbdiff.shapes.train` (see its docstring).",
        "",
        "## Scores",
        "",
        f"* VAE reconstruction PSNR on 256 rendered scenes: mean {vae['psnr_mean']:.2f} dB "
        f"(median {vae['psnr_median']:.2f}, min {vae['psnr_min']:.2f}).",
    ]
    quick = info.get("quick_eval")
    if quick:
        lines.append(f"* Quick check during training (step {quick['step']}, {quick['captions']} captions, "
                     f"{quick['ddim_steps']} DDIM steps): single-object fully right {float(quick['single_full']):.0%}, "
                     f"two-object fully right {float(quick['two_full']):.0%}.")
    evaluation = info.get("evaluation")
    if evaluation:
        lines.append(f"* `python -m pfbdiff.shapes.evaluate` ({evaluation['captions']} captions, half with held-out "
                     f"combinations, {evaluation['steps']} DDIM steps, CFG {evaluation['guidance']}): single-object "
                     f"fully right {evaluation['single_full']:.1%} (held-out {evaluation['single_heldout_full']:.1%}), "
                     f"two-object fully right {evaluation['two_full']:.1%} (held-out "
                     f"{evaluation['two_heldout_full']:.1%}); background colour {evaluation['all_background']:.1%}, "
                     f"pattern {evaluation['all_pattern']:.1%}.")
    else:
        lines.append("* Full evaluation: not yet run on these weights (`python -m pfbdiff.shapes.evaluate --card`).")
    lines += ["", f"Exported {info['exported']}.", ""]
    card_path.write_text("\n".join(lines))
    return card_path


# ------------------------------------------------------------------------------------------------ command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pfbdiff.shapes.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/shapes", help="run folder: checkpoints, logs, the trained VAE")
    parser.add_argument("--stage", choices=("vae", "decoder", "unet", "all"), default="all",
                        help="all = vae, then decoder fine-tuning (if --decoder-steps), then unet")
    parser.add_argument("--resume", action="store_true",
                        help="accepted for clarity: an existing checkpoint in --out is always resumed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--decoder-steps", type=int, default=0, help="decoder-only fine-tuning steps after the VAE")
    parser.add_argument("--decoder-lr", type=float, default=5e-4)
    parser.add_argument("--kl-weight", type=float, default=1e-5)
    parser.add_argument("--edge-weight", type=float, default=0.5)
    parser.add_argument("--unet-steps", type=int, default=None, help="stop after this many steps (default: never)")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--snr-gamma", type=float, default=5.0)
    parser.add_argument("--uncond-rate", type=float, default=0.1)
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG scale of the quick evaluations")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop this run after so many minutes")
    parser.add_argument("--checkpoint-minutes", type=float, default=4.0)
    parser.add_argument("--eval-minutes", type=float, default=10.0, help="quick evaluation period (0: never)")
    parser.add_argument("--eval-captions", type=int, default=32)
    parser.add_argument("--eval-steps", type=int, default=12)
    parser.add_argument("--export-dir", default=None, help="export the EMA model here periodically and at the end")
    parser.add_argument("--export-minutes", type=float, default=30.0)
    parser.add_argument("--export-only", action="store_true", help="export the latest checkpoint and exit")
    parser.add_argument("--log-every", type=int, default=10)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "export" if args.export_only else args.stage
    (out / f"args_{name}.json").write_text(json.dumps({**vars(args), "argv": sys.argv}, indent=2) + "\n")
    if args.export_only:
        if not args.export_dir:
            raise SystemExit("--export-only needs --export-dir")
        export_model(out, Path(args.export_dir), args)
        return
    stop = StopFlag()
    if args.stage in ("vae", "all"):
        train_vae(args, stop)
    if args.stage in ("decoder", "all") and args.decoder_steps and not stop.stop and (out / "vae" / "config.json").exists():
        train_decoder(args, stop)
    if args.stage in ("unet", "all") and not stop.stop and (out / "vae" / "config.json").exists():
        train_unet(args, stop)


if __name__ == "__main__":
    main(sys.argv[1:])
