"""Where and in what precision a model runs: the device rules every entry point (``serve``, ``extract``,
``export``, the PyTorch API) applies the same way, with the same messages."""

from __future__ import annotations

import numpy as np
import torch

from yolostream.v1 import vocab, wire

#: Output dtypes by the names of the wire contract (``vocab.DTYPES``); ``uint8`` holds 8-bit affine codes.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}
#: The numpy dtype each torch output dtype is held in on the host: the wire's storage rule (``wire.storage_dtype``:
#: bfloat16, which numpy lacks, as its uint16 bit patterns).
HOST_DTYPES = {TORCH_DTYPES[name]: wire.storage_dtype(code) for name, code in vocab.DTYPES.items()}
#: Largest worst-case error of an output, relative to the reference's largest |value|, per model dtype: the fidelity
#: rule for float32 (1e-4), and for float16 a bound of 1e-2, about twenty units of its 2^-11 rounding accumulated
#: over the network's depth. The start-up check (``device.self_check``) and ``export``'s parity check use it.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2}
HALF_NEEDS_CUDA = "--half needs CUDA: float16 on CPU runs about 26x slower than float32"


def resolve_device(device: str | torch.device = "auto", option: str = "--device ") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for CUDA without one is an error, not a silent fallback.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (or a ``torch.device``).
        option: how the caller's user spelled the setting, put before the value in the message: the flag
            ``--device `` for the commands, ``device=`` for the library's ``feature_extractor``.
    """
    name = (str(device) if device else "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{option}cuda was requested but torch sees no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {str(device)[:40]!r}: choose auto, cpu or cuda[:N]")
    return torch.device(name)


def check_half(device: torch.device, half: bool) -> None:
    """float16 is for CUDA only: on CPU it is correct but far slower, so asking for it there is refused."""
    if half and device.type != "cuda":
        raise ValueError(HALF_NEEDS_CUDA)


def to_host(t: torch.Tensor) -> np.ndarray:
    """A tensor as host numpy in its ``HOST_DTYPES`` storage (bfloat16 as raw uint16 bit patterns)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy().view(HOST_DTYPES[torch.bfloat16])
    return t.cpu().numpy()
