"""The ``--device`` and ``--dtype`` options as torch objects.

:func:`resolve_device` turns a device name into a torch device that is really there (:func:`best_device` for
``auto``), and :func:`resolve_dtype` a dtype name into a torch dtype (fp16 on GPUs, fp32 on the CPU for
``auto``). Asking for something this machine lacks raises :class:`PFBDiffError` with the option to use instead.
"""

from __future__ import annotations

import torch

from pfbdiff.errors import PFBDiffError


def best_device() -> torch.device:
    """The fastest available device: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn ``None``/``"auto"``/``"cpu"``/``"cuda"``/``"cuda:N"``/``"mps"`` into an available torch device."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return best_device()
    try:
        resolved = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as err:
        raise PFBDiffError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from err

    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PFBDiffError(
                f"device {device!r} was asked for but CUDA is not available (no GPU visible or a CPU-only torch); "
                "use --device cpu or install a CUDA build of torch"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise PFBDiffError(
                f"device {device!r} does not exist: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "use --device cuda:0"
            )
    elif resolved.type == "mps":
        if not _mps_available():
            raise PFBDiffError(f"device {device!r} was asked for but MPS is not available; use --device cpu")
    elif resolved.type != "cpu":
        raise PFBDiffError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return resolved


DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> torch.dtype:
    """Turn a dtype name into a torch dtype; ``None``/``"auto"`` means fp16 on GPUs and fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise PFBDiffError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    if dtype is None or dtype.strip().lower() == "auto":
        device_type = resolve_device(device).type
        return torch.float16 if device_type in ("cuda", "mps") else torch.float32
    name = dtype.strip().lower().removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise PFBDiffError(f"unknown dtype {dtype!r}; use auto, float32 (fp32), float16 (fp16) or bfloat16 (bf16)")
    return DTYPE_NAMES[name]
