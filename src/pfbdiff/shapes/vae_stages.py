"""The autoencoder stages of the ShapesWorld training: ``--stage vae`` and ``--stage decoder``.

:func:`train_vae` trains the ``AutoencoderKL`` from scratch on L1 + L2 + edge (image-gradient L1) + a small KL
term, then :func:`finish_vae` sets ``scaling_factor`` from the measured latent std and saves ``<out>/vae``.
:func:`train_decoder` optionally fine-tunes the decoder alone afterwards. Both resume from
``<out>/vae_checkpoint.pt`` / ``<out>/decoder_checkpoint.pt``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pfbdiff.shapes.evaluate import reconstruction_psnr
from pfbdiff.shapes.training_loop import (
    Checkpointer,
    StopFlag,
    append_csv,
    log,
    lr_at,
    optimizer_step,
    replace_folder,
)
from pfbdiff.shapes.training_setup import (
    count_parameters,
    load_vae,
    sample_latents,
    training_batch,
    vae_config,
)

# Images measured by finish_vae: MEASURE_BATCHES batches of MEASURE_BATCH for the latent std, PSNR_IMAGES for
# the reconstruction PSNR (also after decoder fine-tuning). Module constants so that tests can shrink them.
MEASURE_BATCHES, MEASURE_BATCH = 4, 64
PSNR_IMAGES = 256


def image_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 distance between the horizontal and vertical finite differences of two image batches (edge loss)."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def train_psnr(l2: torch.Tensor) -> float:
    """PSNR (dB) of a mean squared error between images in [-1, 1]."""
    return 10 * math.log10(4.0 / max(l2.item(), 1e-12))  # images span 2 units in [-1, 1]


def save_vae_folder(vae, info: dict, final_dir: Path) -> None:
    """Save ``vae`` (safetensors) with ``info`` as its ``training.json``, replacing ``final_dir`` in one move."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    replace_folder(tmp, final_dir)


# ------------------------------------------------------------------------------------------------ stage 1: VAE


def train_vae(args, stop: StopFlag) -> None:
    """Train the VAE for ``--vae-steps`` steps (cosine decay), then finish it; nothing to do if ``<out>/vae`` exists."""
    from diffusers import AutoencoderKL

    out = Path(args.out)
    final_dir = out / "vae"
    if (final_dir / "config.json").exists():
        log(f"VAE already trained: {final_dir}")
        return
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    step = 0

    def state() -> dict:
        return {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "elapsed": clock.elapsed}

    clock = Checkpointer(out / "vae_checkpoint.pt", args, stop, state)
    resumed = clock.start("VAE")
    if resumed:
        vae.load_state_dict(resumed["vae"])
        optimizer.load_state_dict(resumed["optimizer"])
        step = resumed["step"]
    else:
        log(f"VAE: {count_parameters(vae) / 1e6:.3f}M parameters, {args.vae_steps} steps of batch {args.vae_batch}")
    vae.train()
    window: list[float] = []  # training PSNRs since the last log row
    while step < args.vae_steps and not stop.stop:
        with clock.timed():
            images, _, _ = training_batch(args.seed, "vae", step, args.vae_batch)
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            posterior = vae.encode(images).latent_dist
            latents = sample_latents(posterior, generator)
            recon = vae.decode(latents).sample
            l1 = (recon - images).abs().mean()
            l2 = F.mse_loss(recon, images)
            edge = image_gradient_l1(recon, images)
            kl = posterior.kl().mean() / latents[0].numel()
            loss = l1 + l2 + args.edge_weight * edge + args.kl_weight * kl
            optimizer_step(optimizer, loss, vae.parameters(), lr_at(step, args.vae_lr, 50, args.vae_steps))
            step += 1
        window.append(train_psnr(l2))
        if step % args.log_every == 0 or step == args.vae_steps:
            append_csv(out / "vae_log.csv", {"step": step, "elapsed_s": round(clock.elapsed, 1),
                                             "loss": round(loss.item(), 5), "l1": round(l1.item(), 5),
                                             "l2": round(l2.item(), 6), "kl": round(kl.item(), 4),
                                             "train_psnr": round(float(np.mean(window)), 2),
                                             "lr": f"{optimizer.param_groups[0]['lr']:.2e}"})
            if clock.console_due():
                log(f"VAE step {step}: loss {loss.item():.4f}, train PSNR {np.mean(window):.2f} dB, "
                    f"{clock.elapsed / step:.2f} s/step")
            window = []
        clock.end_of_step()
    clock.save()
    if step < args.vae_steps:
        log(f"VAE: stopped at step {step}; rerun the same command to resume")
        return
    finish_vae(vae, final_dir, args, clock.elapsed, step)


@torch.no_grad()
def finish_vae(vae, final_dir: Path, args, elapsed: float, step: int) -> None:
    """Measure the latent std, set ``scaling_factor`` and save the VAE (fp32) with its PSNR."""
    vae.eval()
    latents = []
    for index in range(MEASURE_BATCHES):
        images, _, _ = training_batch(args.seed + 1, "vae", index, MEASURE_BATCH)
        latents.append(vae.encode(images).latent_dist.mean)
    latents = torch.cat(latents)
    std = latents.std().item()
    scaling = round(1.0 / std, 5)
    vae.register_to_config(scaling_factor=scaling)
    psnr = reconstruction_psnr(vae, PSNR_IMAGES)
    info = {"steps": step, "batch_size": args.vae_batch, "seconds": round(elapsed, 1),
            "latent_mean": latents.mean().item(), "latent_std": std, "scaling_factor": scaling, **psnr}
    save_vae_folder(vae, info, final_dir)
    log(f"VAE done: {info}")


# ------------------------------------------------------------------------------------------------ decoder fine-tuning


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
    step = 0

    def state() -> dict:
        return {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "elapsed": clock.elapsed}

    clock = Checkpointer(out / "decoder_checkpoint.pt", args, stop, state)
    resumed = clock.start("decoder")
    if resumed:
        vae.load_state_dict(resumed["vae"])
        optimizer.load_state_dict(resumed["optimizer"])
        step = resumed["step"]
    vae.decoder.train()
    while step < args.decoder_steps and not stop.stop:
        with clock.timed():
            images, _, _ = training_batch(args.seed, "decoder", step, args.vae_batch)
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 900_000_000 + step)
            with torch.no_grad():
                latents = sample_latents(vae.encode(images).latent_dist, generator)
            recon = vae.decode(latents).sample
            l2 = F.mse_loss(recon, images)
            loss = (recon - images).abs().mean() + l2 + args.edge_weight * image_gradient_l1(recon, images)
            optimizer_step(optimizer, loss, trainable, lr_at(step, args.decoder_lr, 20, args.decoder_steps))
            step += 1
        if step % args.log_every == 0:
            append_csv(out / "decoder_log.csv", {"step": step, "elapsed_s": round(clock.elapsed, 1),
                                                 "loss": round(loss.item(), 5), "train_psnr": round(train_psnr(l2), 2)})
            if clock.console_due():
                log(f"decoder step {step}: loss {loss.item():.4f} ({clock.elapsed / step:.2f} s/step)")
        clock.end_of_step()
    clock.save()
    if step < args.decoder_steps:
        log(f"decoder: stopped at step {step}; rerun the same command to resume")
        return
    vae.eval().requires_grad_(False)
    info.update({"decoder_steps": step, "decoder_seconds": round(clock.elapsed, 1),
                 **reconstruction_psnr(vae, PSNR_IMAGES)})
    save_vae_folder(vae, info, final_dir)
    log(f"decoder fine-tuned: {info}")
