"""Argument checks shared by the blocks, and the one rule for checks that read values.

Legend: T tokens, E experts, K experts per token.

Checks of shapes, dtypes and devices read only metadata and always run. A check of a
tensor's *values* (expert ids in range, group sizes that sum to the rows) has to read
the result on the host. On CPU tensors that costs nothing more than the arithmetic, so
those checks always run there. On a GPU it is a device-to-host sync that stalls the
launch queue, so there the blocks run them only when built with ``sync_checks=True``
(:func:`value_checks` is the rule, in one place). While ``torch.compile`` traces no value
is checked: the graph carries no data-dependent branch.

Every error names the argument, the expected shape or range and what was given.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def value_checks(tensor: Tensor, sync_checks: bool) -> bool:
    """Whether to run a check that reads ``tensor``'s values on the host.

    True for CPU tensors, for other devices only with ``sync_checks`` (one device sync
    per check), and never while ``torch.compile`` traces or for meta tensors.
    """
    if torch.compiler.is_compiling() or tensor.device.type == "meta":
        return False
    return tensor.device.type == "cpu" or bool(sync_checks)


def check_tensor(value: object, name: str) -> Tensor:
    """A ``torch.Tensor``; TypeError otherwise."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(value: object, name: str, ndim: int | None = None) -> Tensor:
    """A floating-point tensor, of ``ndim`` dims when given."""
    tensor = check_tensor(value, name)
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if ndim is not None and tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(tensor.shape)}")
    return tensor


def check_index(value: object, name: str, ndim: int | None = None) -> Tensor:
    """An integer tensor (bool is refused: it is not an index), of ``ndim`` dims when given."""
    tensor = check_tensor(value, name)
    if tensor.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got dtype {tensor.dtype}")
    if ndim is not None and tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(tensor.shape)}")
    return tensor


def check_int(value: object, name: str, low: int = 1) -> int:
    """A Python int ``>= low`` (bool is refused although it subclasses int)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_same_device(tensor: Tensor, name: str, other: Tensor, other_name: str) -> None:
    """``tensor`` on ``other``'s device."""
    if tensor.device != other.device:
        raise ValueError(
            f"{name} is on {tensor.device} but {other_name} is on {other.device}; "
            "expected both on the same device"
        )


def check_tokens(tokens: object, dim: int, name: str = "tokens") -> Tensor:
    """A floating ``[T, dim]`` tensor."""
    tensor = check_float(tokens, name)
    if tensor.ndim != 2 or tensor.shape[1] != dim:
        raise ValueError(f"{name} must have shape [T, {dim}], got {tuple(tensor.shape)}")
    return tensor


def check_expert_ids(
    experts: Tensor, num_experts: int, sync_checks: bool, name: str = "experts"
) -> None:
    """Every id in ``[0, num_experts)``; reads the values (see :func:`value_checks`)."""
    if experts.numel() == 0 or not value_checks(experts, sync_checks):
        return
    low, high = torch.aminmax(experts)
    if bool((low < 0) | (high >= num_experts)):  # host sync on a GPU
        raise ValueError(
            f"{name} must hold expert ids in [0, {num_experts}) (num_experts={num_experts}), "
            f"got values in [{int(low)}, {int(high)}]"
        )


def warn_non_finite(values: Mapping[str, Tensor | float], where: str) -> bool:
    """Warn (once per ``where``) when any of the scalar ``values`` is NaN or inf.

    Reads the values on the host: call it where they are there already (CPU tensors,
    or numbers brought over for logging), never as an extra sync on a GPU. The message
    names ``where`` and nothing that changes between calls, so Python's default warning
    filter shows it once per ``where``.

    Returns:
        True if a value was not finite.
    """
    if not values:
        return False
    flags = torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in values.values()])
    ok = torch.isfinite(flags).tolist()  # one host read for all values
    if all(ok):
        return False
    warnings.warn(
        f"{where}: its aux losses are NaN or inf, so every gradient through them is too; "
        "a NaN or inf input token is the usual cause (MoELayer(check_finite=True) names "
        "it, at one device sync per call). Shown once.",
        RuntimeWarning,
        stacklevel=2,  # the caller's line (a layer's forward, a trainer): stable across calls
    )
    return True
