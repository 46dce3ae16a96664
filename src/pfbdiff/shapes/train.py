"""Train the bundled ShapesWorld text-to-image model: a small Stable-Diffusion-shaped latent diffusion model.

A developer tool, run as ``python -m pfbdiff.shapes.train`` (argparse, outside the
``pfbdiff`` command): it serves the people who build the bundled model and its benchmarks, not users editing photos.

Three stages, each resumable (rerun the same command after an interruption and it carries on from the last
checkpoint, bit for bit in its data and noise streams):

1. ``--stage vae``: an ``AutoencoderKL`` with downscale factor 4 (64 x 64 x 3 images to 16 x 16 x 4
   latents), trained with L1 + L2 + an edge (image-gradient) L1 loss and a small KL term. At the end the
   latent standard deviation is measured and ``scaling_factor`` set so that scaled latents have unit std.
2. ``--stage decoder`` (only with ``--decoder-steps``): fine-tuning of the VAE decoder alone; the encoder,
   hence the latents the U-Net learns on, stays fixed.
3. ``--stage unet``: a ``UNet2DConditionModel`` (cross-attention at the 16 x 16 and 8 x 8 levels and in the
   mid block) and a ``CLIPTextModel`` trained from scratch together, on v-prediction with a zero-terminal-SNR
   ``DDIMScheduler`` ("trailing" timesteps), min-SNR-gamma loss weights, AdamW with warm-up, EMA weights,
   and 10 % empty captions for classifier-free guidance.

``--stage all`` runs them in turn. Training scenes are rendered on the fly from the ``"train"`` split (held-out
combinations never appear). Every few minutes the state goes to ``<out>/<stage>_checkpoint.pt``; a quick oracle
evaluation of the EMA model is logged to ``<out>/unet_eval.csv``; with ``--export-dir`` the EMA model is
exported there as a diffusers Stable Diffusion folder (fp16 safetensors) together with a model card.

This module is the command line; the work is done by :mod:`~pfbdiff.shapes.training_setup` (configs, data),
:mod:`~pfbdiff.shapes.training_loop` (checkpoints, clock, logs), :mod:`~pfbdiff.shapes.vae_stages`,
:mod:`~pfbdiff.shapes.unet_stage` and :mod:`~pfbdiff.shapes.export`.

Usage::

    python -m pfbdiff.shapes.train --out runs/shapes --stage all --export-dir src/pfbdiff/shapes/model
    python -m pfbdiff.shapes.train --out runs/shapes --export-only --export-dir src/pfbdiff/shapes/model
    # train the shipped model on (how its last 3,001 steps were made, from step 1396 to 4397):
    python -m pfbdiff.shapes.train --out runs/more --stage unet --init-from src/pfbdiff/shapes/model \
        --threads 2 --lr 6e-4 --object-weight 3 --decay-until 4400 --max-minutes 85
    # its GPU steps 4397-10966 on an H200, in two runs, each continuing from the previous export
    # (the first with --decay-until 13400 --max-minutes 6.5 --workers 12, stopped at step 8714):
    python -m pfbdiff.shapes.train --out runs/gpu2 --stage unet --init-from src/pfbdiff/shapes/model \
        --device cuda --workers 14 --batch 128 --lr 6e-4 --object-weight 3 --decay-until 10800 --max-minutes 3 \
        --eval-minutes 0 --export-dir src/pfbdiff/shapes/model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pfbdiff.shapes.export import export_model
from pfbdiff.shapes.training_loop import StopFlag, hardware
from pfbdiff.shapes.training_setup import FAMILIES
from pfbdiff.shapes.unet_stage import train_unet
from pfbdiff.shapes.vae_stages import train_decoder, train_vae


def parse_args(argv=None) -> argparse.Namespace:
    """The command-line options (``argv`` None: ``sys.argv``)."""
    parser = argparse.ArgumentParser(prog="python -m pfbdiff.shapes.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/shapes", help="run folder: checkpoints, logs, the trained VAE")
    parser.add_argument("--stage", choices=("vae", "decoder", "unet", "all"), default="all",
                        help="all = vae, then decoder fine-tuning (if --decoder-steps), then unet")
    parser.add_argument("--resume", action="store_true",
                        help="accepted for clarity: an existing checkpoint in --out is always resumed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, default="sd1",
                        help="the U-Net and text-encoder layout: sd1 (the bundled model) or sdxl (two text encoders, "
                             "pooled vector, size ids, no cross-attention at the top level); an sdxl run started "
                             "--init-from an sd1 export is warm-started from it")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="where the U-Net stage trains (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes rendering the U-Net stage's batches ahead of the training (0: none)")
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
    parser.add_argument("--decay-until", type=int, default=None,
                        help="cosine learning-rate decay to 10 %% at this U-Net step (default: constant)")
    parser.add_argument("--object-weight", type=float, default=0.0,
                        help="extra loss weight on latent pixels covered by objects (0: plain mean)")
    parser.add_argument("--init-from", default=None,
                        help="start the U-Net stage from this exported model when --out has no checkpoint yet")
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
    """Run the requested stages (or only the export), recording the options in ``<out>/args_<stage>.json``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "export" if args.export_only else args.stage
    record = {**vars(args), "argv": sys.argv, "hardware": hardware(args.device)}
    (out / f"args_{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.export_only:
        if not args.export_dir:
            raise SystemExit("--export-only needs --export-dir")
        export_model(out, Path(args.export_dir), args)
        return
    stop = StopFlag()
    if args.stage in ("vae", "all"):
        train_vae(args, stop)
    trained_vae = out / "vae" / "config.json"  # written only when the VAE stage finishes (or by --init-from)
    if args.stage in ("decoder", "all") and args.decoder_steps and not stop.stop and trained_vae.exists():
        train_decoder(args, stop)
    if args.stage in ("unet", "all") and not stop.stop and (trained_vae.exists() or args.init_from):
        train_unet(args, stop)


if __name__ == "__main__":
    main(sys.argv[1:])
