"""Argument checks shared by the kernel entry points.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows, D dim.

Every check raises with the argument's name, what was expected and what was given, so a
wrong call fails in Python before a kernel reads memory it should not.
"""

import torch
from triton.runtime.interpreter import InterpretedFunction

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_launchable(kernel: object, tensor: torch.Tensor, name: str) -> None:
    """Refuse tensors that ``kernel`` cannot run on, instead of failing inside Triton.

    Triton reads ``TRITON_INTERPRET`` once, when a kernel is decorated (that is, when
    ``moeblocks.kernels`` is first imported), so the kernel object itself (under any
    autotune or heuristics wrappers) says whether it runs on the CPU through the
    interpreter.
    """
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu":
        while not isinstance(kernel, InterpretedFunction) and hasattr(kernel, "fn"):
            kernel = kernel.fn
        if isinstance(kernel, InterpretedFunction):
            return
        raise RuntimeError(
            f"{name} is a CPU tensor, but the Triton kernels were compiled for the GPU: "
            "Triton runs CPU tensors only through its interpreter. Set TRITON_INTERPRET=1 "
            "before moeblocks.kernels is first imported (slow, for testing), move the "
            "tensors to CUDA, or use the 'torch' dispatcher."
        )
    raise RuntimeError(
        f"{name} is on device {tensor.device}, where Triton cannot run; "
        "expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1)."
    )


def check_float(tensor: object, name: str, rank: int) -> None:
    """A floating tensor of the given rank."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    if tensor.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(tensor.shape)}")


def check_index(tensor: object, name: str, rank: int) -> None:
    """An integer tensor of the given rank (bool is refused: it is not an index)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must hold integer ids, got dtype {tensor.dtype}")
    if tensor.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(tensor.shape)}")


def check_positive_int(value: object, name: str) -> None:
    """A Python int >= 1 (bool is refused although it subclasses int)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_same_device(
    first: torch.Tensor, first_name: str, *others: tuple[torch.Tensor, str]
) -> None:
    """All tensors on ``first``'s device."""
    for tensor, name in others:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}; "
                "expected both on the same device"
            )


def check_length(tensor: torch.Tensor, name: str, expected: int, why: str) -> None:
    """``tensor.shape[0] == expected``."""
    if tensor.shape[0] != expected:
        raise ValueError(
            f"{name} must have {expected} rows ({why}), got shape {tuple(tensor.shape)}"
        )


def check_slot_index(
    row_of_slot_N: torch.Tensor, slot_of_row_R: torch.Tensor, num_tokens: int, top_k: int
) -> None:
    """The two index tensors of one layout, consistent with T tokens and top-k."""
    check_positive_int(top_k, "top_k")
    check_index(row_of_slot_N, "row_of_slot", 1)
    check_index(slot_of_row_R, "slot_of_row", 1)
    check_length(row_of_slot_N, "row_of_slot", num_tokens * top_k, "T·K slots")
    if slot_of_row_R.shape[0] < row_of_slot_N.shape[0]:
        raise ValueError(
            f"slot_of_row must have at least N = {row_of_slot_N.shape[0]} rows (one per "
            f"slot plus padding), got shape {tuple(slot_of_row_R.shape)}"
        )
