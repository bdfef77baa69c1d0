"""Device choice for the commands: ``--device auto|cpu|cuda|cuda:N``."""

from __future__ import annotations

import torch

from moeblocks.runtime.errors import UsageError

__all__ = ["resolve_device"]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device.

    Raises:
        UsageError: For CUDA on a machine without it, or an unknown device string.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UsageError(
            f"--device {device!r} is not a torch device (try cpu, cuda, auto)"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    return dev
