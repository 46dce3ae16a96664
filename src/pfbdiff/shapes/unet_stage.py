"""The diffusion stage of the ShapesWorld training: ``--stage unet``.

:func:`train_unet` trains the ``UNet2DConditionModel`` and the ``CLIPTextModel`` from scratch together on the
frozen VAE's latents: v-prediction on the zero-terminal-SNR DDIM schedule, min-SNR-gamma loss weights
(:func:`snr_weights`), AdamW with warm-up, EMA weights (:class:`EMA`) and empty captions at ``--uncond-rate``
for classifier-free guidance; ``--object-weight`` weights the loss on latent pixels covered by objects, which
are small and carry the shape. It resumes from ``<out>/unet_checkpoint.pt``, or with ``--init-from`` starts
from an exported model (:func:`checkpoint_from_export`); it logs an oracle score of the EMA model to
``<out>/unet_eval.csv`` (:func:`quick_eval`) and exports it with ``--export-dir``.
"""

from __future__ import annotations

import json
import shutil
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
    atomic_save,
    log,
    lr_at,
    optimizer_step,
)
from pfbdiff.shapes.training_setup import (
    EMPTY_CAPTION,
    TRAINED,
    batch_stream,
    build_unet_stage,
    caption_conditioning,
    count_parameters,
    denoiser,
    load_vae,
    sample_latents,
    trained_modules,
    warm_start_from_sd1,
    warm_start_sd3_from_sd1,
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


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error with per-latent-pixel ``weights`` (normalised by their sum)."""
    return (weights * (prediction - target) ** 2).sum(dim=(1, 2, 3)) / (weights.sum(dim=(1, 2, 3)) * target.shape[1])


def flow_matching_loss(transformer, latents, noise, conditioning, weights, generator) -> torch.Tensor:
    """Rectified-flow loss of the SD3-layout model (docs/method.md §13): at σ drawn logit-normally (SD3's
    training density, most weight at mid noise) the model sees ``(1 − σ) x₀ + σ ε`` at timestep 1000 σ and is
    asked for the velocity ``ε − x₀``."""
    sigmas = torch.sigmoid(torch.randn(len(latents), generator=generator)).to(latents.device)
    shaped = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - shaped) * latents + shaped * noise
    prediction = transformer(hidden_states=noisy, timestep=1000 * sigmas, encoder_hidden_states=conditioning.tokens,
                             pooled_projections=conditioning.pooled).sample
    return weighted_mse(prediction, noise - latents, weights).mean()


def object_loss_weights(objects: torch.Tensor, latent_size: int, object_weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights ``1 + object_weight * (fraction of the pixel's image area on an object)``."""
    coverage = torch.nn.functional.adaptive_avg_pool2d(objects, latent_size)
    return 1 + object_weight * coverage


def checkpoint_from_export(model_dir: Path, out: Path, seed: int, family: str = "sd1") -> None:
    """Turn an exported model into the run folder ``out``: its VAE, and a U-Net checkpoint holding its weights.

    The exported (EMA) weights become both the training weights and the EMA; the step count and training clock
    carry on from the export's ``training.json``; the optimizer starts afresh, so the checkpoint records
    ``warmup_from`` and the learning rate warms up again from there. An SD-1-layout export starts an SDXL-layout
    run (``family="sdxl"``) through :func:`~pfbdiff.shapes.training_setup.warm_start_from_sd1`: its steps and
    clock then count from zero, and the card names the model it started from.
    """
    info = json.loads((model_dir / "training.json").read_text())
    exported_family = info.get("family", "sd1")
    shutil.copytree(model_dir / "vae", out / "vae")
    (out / "vae" / "training.json").write_text(json.dumps(info["vae"], indent=2) + "\n")
    components = build_unet_stage(out, seed, family)
    if exported_family == family:
        phases = info.get("unet_phases") or [{"steps": [0, info["unet_steps"]], "batch": info["unet_batch_size"]}]
        phases = [{"hardware": info["hardware"], **phase} for phase in phases]  # exports before phases named theirs
        for name in TRAINED:
            if name in components:
                loaded = type(components[name]).from_pretrained(model_dir / name).float()
                components[name].load_state_dict(loaded.state_dict())
        step, elapsed, cpu_seconds = info["unet_steps"], info["unet_seconds"], info.get("unet_cpu_seconds") or 0.0
        if info.get("warm_start"):  # a continued run keeps saying which model it first started from
            (out / "warm_start.json").write_text(json.dumps(info["warm_start"]) + "\n")
    elif exported_family == "sd1" and family in ("sdxl", "sd3"):
        (warm_start_from_sd1 if family == "sdxl" else warm_start_sd3_from_sd1)(components, model_dir)
        phases, step, elapsed, cpu_seconds = [], 0, 0.0, 0.0
        (out / "warm_start.json").write_text(json.dumps(
            {"from": str(model_dir), "unet_steps": info["unet_steps"], "hardware": info["hardware"]}) + "\n")
    else:
        raise SystemExit(f"cannot start a {family} model from the {exported_family} model {model_dir}")
    (out / "unet_phases.json").write_text(json.dumps(phases, indent=2) + "\n")
    params = [p for m in trained_modules(components) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params)
    atomic_save({**{name: components[name].state_dict() for name in TRAINED if name in components},
                 "optimizer": optimizer.state_dict(), "ema": [p.detach().clone() for p in params], "step": step,
                 "elapsed": elapsed, "cpu_seconds": cpu_seconds, "warmup_from": step}, out / "unet_checkpoint.pt")
    log(f"UNet: starting from the exported model {model_dir} (step {step})")


def train_unet(args, stop: StopFlag) -> None:
    """Train until ``--unet-steps`` (or forever), checkpointing, evaluating and exporting on their schedules."""
    out = Path(args.out)
    if args.init_from and not (out / "unet_checkpoint.pt").exists():
        checkpoint_from_export(Path(args.init_from), out, args.seed, args.family)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    vae = load_vae(out).to(device)
    components = build_unet_stage(out, args.seed, args.family)
    model, scheduler = denoiser(components), components["scheduler"]
    modules = trained_modules(components)
    for module in modules:
        module.to(device)
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMA(modules, args.ema_decay)
    # Evaluations and exports are scheduled in training seconds (``clock.elapsed``), so they survive resumes.
    step, warmup_from, next_eval, next_export = 0, 0, args.eval_minutes * 60, args.export_minutes * 60

    def state() -> dict:
        return {**{name: components[name].state_dict() for name in TRAINED if name in components},
                "optimizer": optimizer.state_dict(), "ema": ema.shadow, "step": step, "warmup_from": warmup_from,
                "elapsed": clock.elapsed,
                "cpu_seconds": clock.cpu_seconds, "next_eval": next_eval, "next_export": next_export}

    clock = Checkpointer(out / "unet_checkpoint.pt", args, stop, state, console_seconds=120)
    resumed = clock.start("UNet")
    if resumed:
        for name in TRAINED:
            if name in components:
                components[name].load_state_dict(resumed[name])
        optimizer.load_state_dict(resumed["optimizer"])
        with torch.no_grad():
            for shadow, value in zip(ema.shadow, resumed["ema"], strict=True):
                shadow.copy_(value)
        step, warmup_from = resumed["step"], resumed.get("warmup_from", 0)
        next_eval, next_export = resumed.get("next_eval", next_eval), resumed.get("next_export", next_export)
    else:
        log(f"{type(model).__name__}: {count_parameters(model) / 1e6:.3f}M parameters, text encoder "
            f"{sum(count_parameters(m) for m in modules[1:]) / 1e6:.3f}M, VAE {count_parameters(vae) / 1e6:.3f}M; batch "
            f"{args.batch}, lr {args.lr}")
    for module in modules:
        module.train()
    scaling = vae.config.scaling_factor
    flow = "transformer" in components
    alphas_cumprod = None if flow else scheduler.alphas_cumprod.to(device)
    losses: list[float] = []  # step losses since the last log row
    batches = batch_stream(args.seed, "unet", step, args.batch, args.workers)
    while (args.unet_steps is None or step < args.unet_steps) and not stop.stop:
        with clock.timed():
            images, captions, objects = next(batches)
            images, objects = images.to(device), objects.to(device)
            rng = np.random.default_rng([args.seed, 99, step])
            captions = [EMPTY_CAPTION if rng.random() < args.uncond_rate else c for c in captions]
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 500_000_000 + step)
            with torch.no_grad():
                latents = sample_latents(vae.encode(images).latent_dist, generator) * scaling
            # Noise and timesteps are drawn on the CPU so that the data stream is the same on every device.
            noise = torch.randn(latents.shape, generator=generator).to(device)
            conditioning = caption_conditioning(components, captions)
            weights = object_loss_weights(objects, latents.shape[-1], args.object_weight)
            if flow:
                loss = flow_matching_loss(model, latents, noise, conditioning, weights, generator)
            else:
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),),
                                          generator=generator).to(device)
                noisy = scheduler.add_noise(latents, noise, timesteps)
                target = scheduler.get_velocity(latents, noise, timesteps)
                prediction = model(noisy, timesteps, encoder_hidden_states=conditioning.tokens,
                                   added_cond_kwargs=conditioning.added_cond_kwargs()).sample
                loss = (snr_weights(alphas_cumprod, timesteps, args.snr_gamma)
                        * weighted_mse(prediction, target, weights)).mean()
            optimizer_step(optimizer, loss, params, lr_at(step - warmup_from, args.lr, args.warmup,
                                                           args.decay_until and args.decay_until - warmup_from))
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
    components = ema_components(out, args.seed, ema.shadow, args.family)
    result = generation_accuracy(components, args.eval_captions, steps=args.eval_steps, guidance=args.guidance)
    row = {"step": step, "elapsed_s": round(elapsed, 1), "captions": args.eval_captions, "ddim_steps": args.eval_steps}
    # A few captions leave some groups empty (under 3 there is no train-split single-object caption, under 2
    # no two-object one), and the summary then has no score for them: record the scores there are.
    row.update({key: round(result[key], 3) for key in QUICK_EVAL_KEYS if key in result})
    row["eval_seconds"] = round(time.time() - tick, 1)
    append_csv(out / "unet_eval.csv", row)
    log(f"quick eval at step {step}: {row}")
    return row
