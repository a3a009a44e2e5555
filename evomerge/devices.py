"""Which devices exist here: a device the machine lacks is one clear line, not a CUDA traceback."""

from __future__ import annotations

from evomerge.errors import EvomergeError


def check_device(name: str) -> str:
    """`name` if torch can place tensors there on this machine, else an EvomergeError naming the fix."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise EvomergeError(f"device {name!r} is not a device name; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvomergeError(f"device {name!r}: no CUDA GPU is available here (torch {torch.__version__}, "
                                f"cuda {torch.version.cuda or 'not built in'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvomergeError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise EvomergeError(f"device {name!r}: Apple MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise EvomergeError(f"device {name!r} is not supported; use cpu or cuda")
    return name
