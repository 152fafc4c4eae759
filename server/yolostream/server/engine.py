"""The device side: owns the model on CUDA or CPU, its dtype and fusion, and runs truncated forwards on batches.

Frames arrive letterboxed as uint8 (4× fewer bytes to move than float); normalisation to [0, 1] happens on the
device, in the model's dtype, exactly as upstream does it (``.float()`` or ``.half()``, then ``/ 255``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from .model.catalogue import LayerInfo, ResolvedLayer, build_catalogue, resolve_layers
from .model.loader import LoadedModel
from .model.modules import fuse_model
from .model.plan import ForwardPlan, make_plan, run_plan
from .preprocess import POLICIES as LETTERBOX_POLICIES
from .preprocess import Letterbox, input_shape, prepare

log = logging.getLogger(__name__)

POOLINGS = ("none", "avg", "max")
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for CUDA without one is an error, not a silent fallback."""
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: choose auto, cpu or cuda[:N]")
    return torch.device(name)


@dataclass
class FrameFeatures:
    """One frame's requested layers (name as requested → float32 array without the batch dim) and its letterbox."""

    features: dict[str, np.ndarray]
    letterbox: Letterbox


class Engine:
    """A model resident on one device, ready to run truncated forwards on batches of frames."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str = "auto",
        half: bool = False,
        channels_last: bool | None = None,
        fuse: bool = True,
        imgsz: int = 640,
        letterbox: str = "auto",
    ) -> None:
        self.loaded = loaded
        self.device = resolve_device(device)
        if half and self.device.type != "cuda":
            raise ValueError("--half needs CUDA: float16 on CPU runs about 26x slower than float32")
        if letterbox not in LETTERBOX_POLICIES:
            raise ValueError(f"unknown letterbox policy {letterbox!r}: choose {', '.join(LETTERBOX_POLICIES)}")
        self.dtype = torch.float16 if half else torch.float32
        self.channels_last = bool(channels_last if channels_last is not None else self.device.type == "cuda")
        if self.channels_last and self.device.type != "cuda":
            raise ValueError("channels_last is only used on CUDA")
        model = loaded.model.eval()
        if fuse:
            fuse_model(model)
        self.fused = fuse
        model.to(self.device, self.dtype)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.layers = model.model
        self.stride = max(int(model.stride.max()), 32) if getattr(model, "stride", None) is not None else 32
        self.imgsz = int(imgsz)
        self.letterbox_policy = letterbox
        self._plans: dict[tuple[int, ...], ForwardPlan] = {}
        self._catalogues: dict[tuple[int, int], list[LayerInfo]] = {}
        self.default_catalogue = self.catalogue()

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def random_weights(self) -> bool:
        return self.loaded.random_weights

    def input_hw(self, imgsz: int | None = None) -> tuple[int, int]:
        """The square model input for ``imgsz``, rounded up to a multiple of the stride (as upstream)."""
        return input_shape(imgsz or self.imgsz, self.stride)

    def catalogue(self, imgsz: int | None = None) -> list[LayerInfo]:
        hw = self.input_hw(imgsz)
        if hw not in self._catalogues:
            self._catalogues[hw] = build_catalogue(self.model, hw)
        return self._catalogues[hw]

    def resolve(self, names: Iterable[str | int]) -> list[ResolvedLayer]:
        """Requested names → layers, raising ValueError that lists the valid names."""
        return resolve_layers(self.default_catalogue, names)

    def plan(self, indices: Iterable[int]) -> ForwardPlan:
        key = tuple(sorted(set(indices)))
        if key not in self._plans:
            self._plans[key] = make_plan(self.layers, key)
        return self._plans[key]

    def preprocess(self, frame: np.ndarray, imgsz: int | None = None, policy: str | None = None) -> tuple[np.ndarray, Letterbox]:
        """Letterbox one BGR frame to CHW RGB uint8 (upstream detect.py's rule)."""
        return prepare(frame, imgsz or self.imgsz, self.stride, policy or self.letterbox_policy)

    def to_input(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Move a (N,3,H,W) batch to the device in the model dtype; uint8 is scaled to [0, 1] there."""
        x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch of shape (N,3,H,W), got {tuple(x.shape)}")
        scale = x.dtype == torch.uint8
        x = x.to(self.device, non_blocking=True).to(self.dtype)
        if scale:
            x = x.div_(255)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, batch: np.ndarray | torch.Tensor, indices: Iterable[int]) -> dict[int, torch.Tensor]:
        """Run the truncated forward for ``indices``; outputs stay on the device, keyed by layer index."""
        plan = self.plan(indices)
        with torch.inference_mode():
            return run_plan(self.layers, self.to_input(batch), plan)

    def fetch(self, outputs: dict[int, torch.Tensor], keys: Sequence[tuple[int, str, str]]) -> dict[tuple[int, str, str], np.ndarray]:
        """Pool and cast on the device, then copy each requested output to the host once.

        ``keys`` are (layer index, pooling, dtype name). Casting happens in torch on the device (``.half()`` is ~30x
        faster than numpy's astype); bfloat16 comes back as its raw uint16 bit patterns, since numpy has no bfloat16.
        """
        host: dict[tuple[int, str, str], np.ndarray] = {}
        with torch.inference_mode():
            for key in keys:
                index, pooling, dtype = key
                t = outputs[index]
                if pooling == "avg":
                    t = t.mean(dim=(2, 3), dtype=torch.float32)
                elif pooling == "max":
                    t = t.amax(dim=(2, 3))
                elif pooling != "none":
                    raise ValueError(f"unknown pooling {pooling!r}: choose {', '.join(POOLINGS)}")
                if dtype not in OUTPUT_DTYPES:
                    raise ValueError(f"unknown dtype {dtype!r}: choose {', '.join(OUTPUT_DTYPES)}")
                t = t.to(OUTPUT_DTYPES[dtype]).contiguous()
                if dtype == "bfloat16":
                    host[key] = t.view(torch.int16).cpu().numpy().view(np.uint16)
                else:
                    host[key] = t.cpu().numpy()
        return host

    def extract(
        self,
        frames: Sequence[np.ndarray],
        layers: Iterable[str | int],
        imgsz: int | None = None,
        policy: str | None = None,
    ) -> list[FrameFeatures]:
        """Preprocess, batch by input shape, and return float32 numpy features per frame, in input order."""
        resolved = self.resolve(layers)
        prepared = [self.preprocess(f, imgsz, policy) for f in frames]
        results: list[FrameFeatures | None] = [None] * len(frames)
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, (chw, _) in enumerate(prepared):
            groups.setdefault(chw.shape, []).append(k)
        for members in groups.values():
            batch = np.stack([prepared[k][0] for k in members])
            out = self.forward(batch, [r.index for r in resolved])
            host = {i: t.float().cpu().numpy() for i, t in out.items()}
            for row, k in enumerate(members):
                feats = {r.name: host[r.index][row] for r in resolved}
                results[k] = FrameFeatures(feats, prepared[k][1])
        return [r for r in results if r is not None]
