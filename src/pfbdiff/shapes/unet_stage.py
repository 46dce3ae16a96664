"""The diffusion stage of the ShapesWorld training: ``--stage unet``.

:func:`train_unet` trains the ``UNet2DConditionModel`` and the ``CLIPTextModel`` from scratch together on the
frozen VAE's latents: v-prediction on the zero-terminal-SNR DDIM schedule, min-SNR-gamma loss weights
(:func:`snr_weights`), AdamW with warm-up, EMA weights (:class:`EMA`) and empty captions at ``--uncond-rate``
for classifier-free guidance. It resumes from ``<out>/unet_checkpoint.pt``, logs an oracle score of the EMA
model to ``<out>/unet_eval.csv`` (:func:`quick_eval`) and exports it with ``--export-dir``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pfbdiff.shapes.evaluate import generation_accuracy
from pfbdiff.shapes.export import ema_components, export_model
from pfbdiff.shapes.training_loop import (
    Checkpointer,
    StopFlag,
    append_csv,
    log,
    lr_at,
    optimizer_step,
)
from pfbdiff.shapes.training_setup import (
    EMPTY_CAPTION,
    build_unet_stage,
    count_parameters,
    load_vae,
    sample_latents,
    training_batch,
)

# Columns of unet_eval.csv taken from the generation_accuracy summary.
QUICK_EVAL_KEYS = ("single_full", "two_full", "all_background", "all_pattern", "all_count", "all_colours", "all_shapes",
                   "single_objects", "two_objects", "single_heldout_full", "single_train_full")


class EMA:
    """Exponential moving average of parameters, decay ``min(max_decay, (1 + step) / (10 + step))``."""

    def __init__(self, modules: list[torch.nn.Module], max_decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.max_decay = max_decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the averages towards the current parameters (``step`` counts the optimizer steps done)."""
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
    """Train until ``--unet-steps`` (or forever), checkpointing, evaluating and exporting on their schedules."""
    out = Path(args.out)
    vae = load_vae(out)
    tokenizer, text_encoder, unet, scheduler = build_unet_stage(out, args.seed)
    modules = [unet, text_encoder]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMA(modules, args.ema_decay)
    # Evaluations and exports are scheduled in training seconds (``clock.elapsed``), so they survive resumes.
    step, next_eval, next_export = 0, args.eval_minutes * 60, args.export_minutes * 60

    def state() -> dict:
        return {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                "optimizer": optimizer.state_dict(), "ema": ema.shadow, "step": step, "elapsed": clock.elapsed,
                "cpu_seconds": clock.cpu_seconds, "next_eval": next_eval, "next_export": next_export}

    clock = Checkpointer(out / "unet_checkpoint.pt", args, stop, state, console_seconds=120)
    resumed = clock.start("UNet")
    if resumed:
        unet.load_state_dict(resumed["unet"])
        text_encoder.load_state_dict(resumed["text_encoder"])
        optimizer.load_state_dict(resumed["optimizer"])
        with torch.no_grad():
            for shadow, value in zip(ema.shadow, resumed["ema"], strict=True):
                shadow.copy_(value)
        step = resumed["step"]
        next_eval, next_export = resumed.get("next_eval", next_eval), resumed.get("next_export", next_export)
    else:
        log(f"UNet: {count_parameters(unet) / 1e6:.3f}M parameters, text encoder "
            f"{count_parameters(text_encoder) / 1e6:.3f}M, VAE {count_parameters(vae) / 1e6:.3f}M; batch "
            f"{args.batch}, lr {args.lr}")
    unet.train()
    text_encoder.train()
    scaling = vae.config.scaling_factor
    alphas_cumprod = scheduler.alphas_cumprod
    losses: list[float] = []  # step losses since the last log row
    while (args.unet_steps is None or step < args.unet_steps) and not stop.stop:
        with clock.timed():
            images, captions = training_batch(args.seed, "unet", step, args.batch)
            rng = np.random.default_rng([args.seed, 99, step])
            captions = [EMPTY_CAPTION if rng.random() < args.uncond_rate else c for c in captions]
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 500_000_000 + step)
            with torch.no_grad():
                latents = sample_latents(vae.encode(images).latent_dist, generator) * scaling
                ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            target = scheduler.get_velocity(latents, noise, timesteps)
            context = text_encoder(ids)[0]
            prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
            per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
            loss = (snr_weights(alphas_cumprod, timesteps, args.snr_gamma) * per_sample).mean()
            optimizer_step(optimizer, loss, params, lr_at(step, args.lr, args.warmup))
            step += 1
            ema.update(step)
        losses.append(loss.item())
        if step % args.log_every == 0:
            append_csv(out / "unet_log.csv", {"step": step, "elapsed_s": round(clock.elapsed, 1),
                                              "cpu_s": round(clock.cpu_seconds, 1),
                                              "loss": round(float(np.mean(losses)), 5),
                                              "lr": f"{optimizer.param_groups[0]['lr']:.2e}"})
            if clock.console_due():
                log(f"UNet step {step}: loss {np.mean(losses):.4f} ({clock.elapsed / step:.2f} s/step overall)")
            losses = []
        if args.eval_minutes and clock.elapsed >= next_eval:
            quick_eval(args, out, ema, step, clock.elapsed)
            next_eval = clock.elapsed + args.eval_minutes * 60
        if args.export_dir and args.export_minutes and clock.elapsed >= next_export:
            clock.save()
            export_model(out, Path(args.export_dir), args)
            next_export = clock.elapsed + args.export_minutes * 60
        clock.end_of_step()
    clock.save()
    log(f"UNet: stopped at step {step} ({clock.elapsed / 60:.1f} min of training)")
    if args.export_dir:
        export_model(out, Path(args.export_dir), args)


def quick_eval(args, out: Path, ema: EMA, step: int, elapsed: float) -> dict:
    """Oracle scores of the EMA model on a few captions with few DDIM steps, appended to ``unet_eval.csv``."""
    tick = time.time()
    components = ema_components(out, args.seed, ema.shadow)
    result = generation_accuracy(components, args.eval_captions, steps=args.eval_steps, guidance=args.guidance)
    row = {"step": step, "elapsed_s": round(elapsed, 1), "captions": args.eval_captions, "ddim_steps": args.eval_steps}
    # A few captions leave some groups empty (under 3 there is no train-split single-object caption, under 2
    # no two-object one), and the summary then has no score for them: record the scores there are.
    row.update({key: round(result[key], 3) for key in QUICK_EVAL_KEYS if key in result})
    row["eval_seconds"] = round(time.time() - tick, 1)
    append_csv(out / "unet_eval.csv", row)
    log(f"quick eval at step {step}: {row}")
    return row
