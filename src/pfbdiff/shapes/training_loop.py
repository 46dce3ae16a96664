"""The machinery shared by the ShapesWorld training loops: checkpoints and their clock, stopping, logs, files.

:class:`Checkpointer` is the bookkeeping of one stage's loop: it resumes from and writes
``<out>/<stage>_checkpoint.pt``, adds up the time spent in training steps, checkpoints every
``--checkpoint-minutes`` and stops the session after ``--max-minutes``. :class:`StopFlag` turns SIGTERM /
SIGINT into a clean stop at the next step boundary.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class StopFlag:
    """Set by SIGTERM / SIGINT so the loops can checkpoint before exiting."""

    def __init__(self) -> None:
        self.stop = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        print(f"signal {signum}: checkpointing and stopping", flush=True)
        self.stop = True


class Checkpointer:
    """One stage's checkpoint file and the clock of its training loop.

    ``state`` returns the stage's whole checkpoint dict (it lists the file's keys). ``elapsed`` and
    ``cpu_seconds`` add up the wall and CPU seconds of the training steps alone, carried over from the
    checkpoint, so that pauses, evaluations and exports do not count and schedules keyed to them survive a resume.
    """

    def __init__(self, path: Path, args, stop: StopFlag, state: Callable[[], dict],
                 console_seconds: float = 60.0) -> None:
        self.path = path
        self.state = state
        self.stop = stop
        self.checkpoint_seconds = args.checkpoint_minutes * 60
        self.max_seconds = args.max_minutes * 60 if args.max_minutes else None
        self.console_seconds = console_seconds
        self.elapsed = self.cpu_seconds = 0.0
        self.session_start = self.last_save = self.last_console = time.time()

    def start(self, name: str) -> dict | None:
        """Start this session's clock; return the saved state (logged as resumed) or None if there is none yet."""
        state = None
        if self.path.exists():
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            self.elapsed, self.cpu_seconds = state["elapsed"], state.get("cpu_seconds", 0.0)
            log(f"{name}: resumed at step {state['step']} ({self.elapsed / 60:.1f} min done)")
        self.session_start = self.last_save = self.last_console = time.time()
        return state

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Count the block (one training step) in ``elapsed`` and ``cpu_seconds``."""
        tick, cpu_tick = time.time(), time.process_time()
        yield
        self.elapsed += time.time() - tick
        self.cpu_seconds += time.process_time() - cpu_tick

    def console_due(self) -> bool:
        """Whether a progress line may go to the console (at most one per ``console_seconds``)."""
        if time.time() - self.last_console <= self.console_seconds:
            return False
        self.last_console = time.time()
        return True

    def save(self) -> None:
        """Write the checkpoint now."""
        atomic_save(self.state(), self.path)

    def end_of_step(self) -> None:
        """Checkpoint if ``--checkpoint-minutes`` have passed since the last one; stop after ``--max-minutes``."""
        if time.time() - self.last_save > self.checkpoint_seconds:
            self.save()
            self.last_save = time.time()
        if self.max_seconds and time.time() - self.session_start > self.max_seconds:
            self.stop.stop = True


def lr_at(step: int, base: float, warmup: int, total: int | None = None, floor: float = 0.1) -> float:
    """Linear warm-up, then constant (``total`` None) or cosine decay to ``floor * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    if total is None:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, lr: float) -> None:
    """Back-propagate ``loss`` and take one step at learning rate ``lr``, gradients clipped to norm 1."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


# ------------------------------------------------------------------------------------------------ files and logs


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through a temporary file, so an interruption never leaves a truncated checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def replace_folder(tmp: Path, final: Path) -> None:
    """Move the fully written folder ``tmp`` to ``final``, replacing any previous one."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


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


def hardware(device: str = "cpu") -> str:
    """The hardware behind ``device`` (for a training phase or an evaluation in ``training.json``): the GPU's
    name, or the CPU and torch thread count."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch CPU thread(s)"


def log(message: str) -> None:
    """A time-stamped console line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
