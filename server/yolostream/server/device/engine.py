"""The device runner: owns the model on CUDA or CPU, its dtype and fusion, and runs truncated forwards on batches.

It is what the micro-batcher drives (``launch``/``collect``) and lives in the device process only; everything
else about the model that is plain data (name, stride, catalogue, name resolution) is its ``card()``.

Frames arrive letterboxed as uint8 (4× fewer bytes to move than float); normalisation to [0, 1] happens on the
device, in the model's dtype, exactly as upstream does it (``.float()`` or ``.half()``, then ``/ 255``).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np
import torch

from yolostream.v1.vocab import BACKENDS, LETTERBOX_POLICIES, POOLINGS

from ..common.card import LayerInfo, ModelCard, ResolvedLayer
from ..common.lifecycle import available_cores
from ..common.object_request import ObjectJob, ObjectResult
from ..common.preprocess import MAX_IMGSZ, Letterbox, input_shape
from ..common.preprocess import letterbox as letterbox_frame
from ..ipc.messages import OutputKey
from ..model.catalogue import build_catalogue
from ..model.graph import input_stride
from ..model.loader import LoadedModel
from ..model.modules import fuse_model
from ..model.onnx_io import auto_backend, require
from ..model.placement import TORCH_DTYPES, check_half, resolve_device, to_host
from .backends import Backend, ForwardPlan, TorchBackend
from .objects import batch_objects
from .self_check import CheckReport, check_served_path
from .objects import object_inputs as objects_needs
from .quantize import affine_records
from .staging import DEFAULT_PINNED_BUDGET, HostPool, StagedCopies, TuningPolicy, cudnn_benchmark, make_event

log = logging.getLogger(__name__)

#: Frame sizes (height, width) of common cameras, 4:3 and 16:9: their letterboxed inputs are warmed up and timed.
CAMERA_FRAMES = ((480, 640), (720, 1280))


@dataclass
class PendingBatch:
    """A launched batch. ``host`` (key → array with a leading batch dim) is filled once collected, and so is
    ``objects`` (per frame an ``ObjectResult``, or None) when any frame asked for boxes."""

    size: int
    keys: tuple[OutputKey, ...]
    host: dict[OutputKey, np.ndarray] | None = None
    compute_us: int = 0
    fetch_us: int = 0
    copies: list = field(default_factory=list)
    timer: tuple = ()
    jobs: list[ObjectJob | None] | None = None
    outputs: dict[int, torch.Tensor] | None = None
    objects: list[ObjectResult | None] | None = None
    input_hw: tuple[int, int] = (0, 0)

    @property
    def ready(self) -> bool:
        return self.host is not None


def _pool(t: torch.Tensor, key: OutputKey) -> tuple[torch.Tensor, torch.dtype]:
    """Pool on the device; returns the pooled (or untouched) tensor and the dtype it is to be sent in.

    ``uint8`` (DTYPE_UINT8_AFFINE) is coded here too, after pooling and per frame: the tensor returned is then the
    batch's (N, record bytes) uint8 records (``quantize.affine_records``, the layout of ``common/affine.py``), so both
    the direct and the staged path carry them like any other output.
    """
    _, pooling, dtype = key
    if pooling == "avg":
        t = t.mean(dim=(2, 3), dtype=torch.float32)
    elif pooling == "max":
        t = t.amax(dim=(2, 3))
    elif pooling != "none":
        raise ValueError(f"unknown pooling {pooling!r}: choose {', '.join(POOLINGS)}")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose {', '.join(TORCH_DTYPES)}")
    if dtype == "uint8":
        return affine_records(t), torch.uint8
    return t, TORCH_DTYPES[dtype]


def _pool_cast(t: torch.Tensor, key: OutputKey) -> torch.Tensor:
    """Pool and cast on the device: ``.half()`` there is ~30x faster than numpy's astype on the host. The cast and
    the contiguous (NCHW) layout are one copy, or none when the tensor already is both."""
    t, dtype = _pool(t, key)
    return t.to(dtype=dtype, memory_format=torch.contiguous_format)


class DeviceRunner:
    """A model resident on one device, ready to run truncated forwards on batches of frames.

    Args:
        loaded: the model and where it came from (``model.loader.load_model``).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        half: float16 weights and activations (CUDA only).
        channels_last: NHWC memory format (default: on CUDA).
        fuse: fold BatchNorm into the convolutions.
        imgsz: default input size; letterbox: default letterbox policy.
        staged: use the pinned-staging, own-stream path (default: on CUDA).
        backend: what runs the truncated forwards (``backends.Backend``): ``torch``, ``onnxruntime`` (the same graph
            exported once per set of layers, ``onnx_backend``) or ``auto`` (``onnx_io.auto_backend``'s rule, resolved
            by ``resolve_backend``).

    The constructor places a copy of ``loaded``'s model (fused, cast, on the device) and leaves the caller's model
    as it was; it runs nothing. The layer catalogue (a probe forward) is built on first use, and ``warmup`` (which
    the server runs before taking frames) resolves ``auto`` and tunes the served shapes.
    """

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
        staged: bool | None = None,
        backend: str = "torch",
    ) -> None:
        self.device = resolve_device(device)
        check_half(self.device, half)
        if letterbox not in LETTERBOX_POLICIES:
            raise ValueError(f"unknown letterbox policy {letterbox!r}: choose {', '.join(LETTERBOX_POLICIES)}")
        self.dtype = torch.float16 if half else torch.float32
        self.channels_last = bool(channels_last if channels_last is not None else self.device.type == "cuda")
        if self.channels_last and self.device.type != "cuda":
            raise ValueError("channels_last is only used on CUDA")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose {', '.join(BACKENDS)}")
        if backend == "onnxruntime":
            require("onnxruntime", "--backend onnxruntime")
        model = copy.deepcopy(loaded.model).eval()
        if fuse:
            fuse_model(model)
        self.fused = fuse
        self.staged = self.device.type == "cuda" if staged is None else bool(staged)
        # The start-up check (``check_fast_path``) compares the served path with these weights in float32 on the CPU,
        # run directly by eager torch; kept only when the served path is something else, and freed once checked.
        reference_path = (self.device.type == "cpu" and not half and not self.channels_last and not self.staged
                          and backend == "torch")
        self._reference = None if reference_path else copy.deepcopy(model)
        self._checked: CheckReport | None = None
        model.to(self.device, self.dtype)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        self.loaded = replace(loaded, model=model)
        self.model = model
        self.layers = model.model
        self.stride = input_stride(model)
        self.imgsz = int(imgsz)
        self.letterbox_policy = letterbox
        self._backends: dict[str, Backend] = {}
        self._backends_lock = threading.Lock()
        self.backend = backend
        self.buckets: tuple[int, ...] = ()
        self.configure_staging()
        self.tuning = TuningPolicy(apply=cudnn_benchmark) if self.device.type == "cuda" else TuningPolicy()
        if self.device.type == "cuda":
            # Fusion, casts and the channels_last copy ran on the default stream; the engine's own stream is not
            # ordered after them, so finish them before anything is launched there.
            torch.cuda.synchronize(self.device)
        self._catalogues: dict[tuple[int, int], list[LayerInfo]] = {}
        self._base_card: ModelCard | None = None

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

    @property
    def _card(self) -> ModelCard:
        """The card without the backend, built on first use (its catalogue runs a probe forward)."""
        if self._base_card is None:
            model, loaded = self.model, self.loaded
            self._base_card = ModelCard(
                name=loaded.name, source=loaded.source, random_weights=loaded.random_weights,
                device=str(self.device), dtype=str(self.dtype).removeprefix("torch."), stride=self.stride,
                imgsz=self.imgsz, letterbox=self.letterbox_policy, catalogue=tuple(self.catalogue()),
                num_classes=int(getattr(model, "nc", 0)), class_names=tuple(loaded.class_names))
        return self._base_card

    def card(self) -> ModelCard:
        """The model as torch-free data, for front-ends, ModelInfo and the CLI (with the backend as resolved and
        what the start-up check measured)."""
        return replace(self._card, backend=self.backend,
                       startup_check=self._checked.summary() if self._checked is not None else "")

    @property
    def default_catalogue(self) -> tuple[LayerInfo, ...]:
        return self._card.catalogue

    def resolve(self, names: Iterable[str | int]) -> list[ResolvedLayer]:
        """Requested names → layers, raising ValueError that lists the valid names."""
        return self._card.resolve(names)

    def plan(self, indices: Iterable[int]) -> ForwardPlan:
        """The truncated forward for ``indices``, built once: a ``TruncatedModel``, or with the onnxruntime backend
        an ``OnnxPlan`` (the same graph as a session); both have ``by_index``."""
        return self.backend_named(self.resolve_backend()).plan(tuple(sorted(set(indices))))

    def backend_named(self, name: str) -> Backend:
        """The backend ``name`` (``torch`` or ``onnxruntime``) over this engine's layers, made on first use."""
        with self._backends_lock:
            backend = self._backends.get(name)
            if backend is None:
                if name == "torch":
                    backend = TorchBackend(self.layers)
                elif name == "onnxruntime":
                    from .onnx_backend import OnnxBackend

                    backend = OnnxBackend(self.layers, self.device, self.dtype, self.input_hw())
                else:
                    raise ValueError(f"unknown backend {name!r}: choose torch or onnxruntime")
                self._backends[name] = backend
        return backend

    def served_path(self) -> str:
        """The served configuration in words, e.g. ``onnxruntime direct float32 cpu`` (the start-up check's path)."""
        layout = " channels_last" if self.channels_last else ""
        way = "staged" if self.staged else "direct"
        return f"{self.backend} {way} {str(self.dtype).removeprefix('torch.')}{layout} {self.device}"

    def check_fast_path(self, layers: Iterable[str | int] | None = None,
                        imgsz: int | None = None) -> CheckReport:
        """Prove the served path against the reference path at start-up (``self_check``), then free the reference
        weights; once proven, the report stands (the weights it needs are gone, and the path does not change).
        Raises ``FastPathMismatch`` (one line) on a mismatch or an error.

        Args:
            layers: the default layers to compare (always with the Detect head's inputs); default: the deepest
                feature layer.
            imgsz: the input size whose served shapes are run (default: the runner's).
        """
        if self._checked is not None:
            return self._checked
        names = {row.index: row.aliases[0] if row.aliases else str(row.index) for row in self._card.catalogue}
        chosen = [(r.name, r.index) for r in self.resolve(layers)] if layers else []
        chosen += [(names[index], index) for index in (self._card.detect_inputs or (self._card.deepest_feature,))]
        unique = list({index: (name, index) for name, index in reversed(chosen)}.values())[::-1]
        report = check_served_path(self, self._reference, unique, self.served_shapes(imgsz), self.served_path())
        self._reference, self._checked = None, report
        log.info("start-up check: %s", report.summary())
        return report

    def resolve_backend(self) -> str:
        """Resolve ``auto`` once (``onnx_io.auto_backend``) and log the choice; other backends stay as given."""
        if self.backend == "auto":
            self.backend = auto_backend(self.device)
            log.info("--backend auto: %s on %s", self.backend, self.device)
        return self.backend

    def preprocess(self, frame: np.ndarray, imgsz: int | None = None, policy: str | None = None) -> tuple[np.ndarray, Letterbox]:
        """Letterbox one BGR frame (upstream detect.py's rule) to the HWC BGR uint8 frame ``launch`` takes."""
        policy = policy or self.letterbox_policy
        return letterbox_frame(frame, input_shape(imgsz or self.imgsz, self.stride), stride=self.stride,
                               auto=policy == "auto")

    def frames_to_input(self, frames: torch.Tensor) -> torch.Tensor:
        """(N,H,W,3) uint8 BGR frames, on the device, → the model input: (N,3,H,W) RGB in [0, 1], model dtype.

        Frames cross from the front-ends in the layout the letterbox wrote them, so the host never transposes.
        The channel flip is one uint8 copy; the cast, the scaling and the final layout are one more pass. The
        values equal upstream's ``img.transpose((2, 0, 1))[::-1] / 255`` exactly (upstream casts first and divides
        in the model dtype; torch computes a half division in float and rounds once, which is what dividing the
        integer in float and storing it as half does), and the result is laid out as ``to_input``'s.
        """
        return self._scale(frames.permute(0, 3, 1, 2).flip(1))

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N,3,H,W) on the device → model dtype in [0, 1] and the model's memory format, in one kernel."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty(x.shape, dtype=self.dtype, device=x.device, memory_format=memory_format)
        return torch.div(x, 255, out=out)

    def to_input(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Move a (N,3,H,W) batch to the device in the model dtype; uint8 is scaled to [0, 1] there."""
        x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch of shape (N,3,H,W), got {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            return self._scale(x)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(dtype=self.dtype, memory_format=memory_format)

    def forward(self, batch: np.ndarray | torch.Tensor, indices: Iterable[int]) -> dict[int, torch.Tensor]:
        """Run the truncated forward for ``indices``; outputs stay on the device, keyed by layer index."""
        plan = self.plan(indices)
        with torch.inference_mode():
            return plan.by_index(self.to_input(batch))

    def launch(self, images: Sequence[np.ndarray], keys: Sequence[OutputKey],
               objects: Sequence[ObjectJob | None] | None = None) -> PendingBatch:
        """Start one batch of letterboxed (H,W,3) uint8 BGR frames: stage, upload, forward, pool and cast, and queue
        the copy back to the host.

        On CUDA the upload, the forward and the download are queued on their own streams (``staging.py``) and
        this returns at once, so the caller can prepare the next batch while the GPU runs this one, and this
        batch's download overlaps the next one's forward; ``collect`` waits for this batch only. The uint8 frames
        go through a pooled pinned block sized for the batch's bucket and one non-blocking upload; batches are
        padded up to a size bucket, and cuDNN tunes only the (shape, bucket) pairs warm-up ran. On CPU the work
        is done before this returns. ``keys`` are (layer index, pooling, dtype name). ``objects``: per frame, the
        boxes and vectors it asks for (``ObjectJob``) or None; detections and vectors are computed from the same
        forward (on CUDA by ``collect``, overlapping the next batch's forward).
        """
        n = len(images)
        keys = tuple(keys)
        jobs = list(objects) if objects is not None and any(job is not None for job in objects) else None
        object_inputs: set[int] = set()
        for request in {job.request for job in jobs or () if job is not None}:
            object_inputs |= objects_needs(self.model, request)
        plan = self.plan(sorted({k[0] for k in keys} | object_inputs))
        if not self.staged:
            start = time.perf_counter()
            batch = np.stack(images) if n > 1 else np.asarray(images[0])[None]
            with torch.inference_mode():
                outputs = plan.by_index(self.frames_to_input(torch.from_numpy(batch)))
                if jobs is not None:
                    found = batch_objects(self.model, outputs, jobs, images[0].shape[:2])
                computed = time.perf_counter()
                host = {key: to_host(_pool_cast(outputs[key[0]], key)) for key in keys}
            return PendingBatch(n, keys, host=host, compute_us=int((computed - start) * 1e6),
                                fetch_us=int((time.perf_counter() - computed) * 1e6),
                                objects=found if jobs is not None else None)
        return self._launch_staged(images, keys, plan, jobs, object_inputs)

    def configure_staging(self, pinned_budget: int = DEFAULT_PINNED_BUDGET, max_imgsz: int = MAX_IMGSZ,
                          pool: HostPool | None = None) -> None:
        """Bound the staged path: the host memory it may pin, and the largest model input it takes.

        Args:
            pinned_budget: bytes of host blocks (pinned on CUDA), counted as the allocator rounds them.
            max_imgsz: inputs over ``input_shape(max_imgsz)`` on either side are refused.
            pool: the host pool to use instead of a new one of ``pinned_budget`` (tests inject an allocator so).
        """
        if getattr(self, "pool", None) is not None:
            self.pool.release_idle()
        self.pool = pool or HostPool(pinned_budget, pin=self.device.type == "cuda")
        self.copies = StagedCopies(self.device, self.pool)
        self.max_input_hw = input_shape(max_imgsz, self.stride)

    def _launch_staged(self, images: Sequence[np.ndarray], keys: tuple[OutputKey, ...], plan: ForwardPlan,
                       jobs: list[ObjectJob | None] | None, object_inputs: set[int]) -> PendingBatch:
        n = len(images)
        h, w = images[0].shape[:2]
        if h > self.max_input_hw[0] or w > self.max_input_hw[1]:
            raise ValueError(f"input {h}x{w} is over the largest model input {self.max_input_hw[0]}x"
                             f"{self.max_input_hw[1]}")
        rows = self.bucket(n)
        x = self.copies.upload(images, rows)
        compute = self.copies.streams.compute
        with self.copies.streams.on(compute), torch.inference_mode():
            start = make_event(self.device, True)
            start.record(compute)
            with self.tuning.scope((h, w), rows):
                outputs = plan.by_index(self.frames_to_input(x))
            parts = [(key, *_pool(outputs[key[0]][:n], key)) for key in keys]
            download = self.copies.download(parts, rows, n, start)
        held = {j: outputs[j] for j in object_inputs} if jobs is not None else None
        return PendingBatch(n, keys, copies=[download], timer=(start, download.computed, download.copied),
                            jobs=jobs, outputs=held, input_hw=(h, w))

    def collect(self, pending: PendingBatch) -> PendingBatch:
        """Wait for ``pending`` (only it, not later batches) and fill in its host arrays and timings.

        The host arrays view a pooled host block, which goes back to the pool when the last of them is dropped.
        """
        if pending.host is not None:
            return pending
        (download,) = pending.copies
        host = self.copies.fetch(download)
        pending.host = host
        pending.compute_us = int(download.start.elapsed_time(download.computed) * 1000)
        pending.fetch_us = int(download.computed.elapsed_time(download.copied) * 1000)
        pending.copies = []
        if pending.jobs is not None:
            began = time.perf_counter()
            with self.copies.streams.on(self.copies.streams.compute), torch.inference_mode():
                pending.objects = batch_objects(self.model, pending.outputs, pending.jobs, pending.input_hw)
            pending.compute_us += int((time.perf_counter() - began) * 1e6)
            pending.outputs = None
        return pending

    def share_cpu(self, workers: int) -> int:
        """On CPU, split the cores between ``workers`` concurrent batches; returns the previous thread count.

        torch's intra-op thread count is process-wide, so whoever calls this restores it when done.
        """
        previous = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, available_cores() // max(1, workers)))
        return previous

    @staticmethod
    def set_cpu_threads(count: int) -> None:
        torch.set_num_threads(count)

    def bucket(self, n: int) -> int:
        """The padded batch size for ``n`` frames on CUDA: the smallest warmed-up bucket that holds them."""
        for size in self.buckets:
            if size >= n:
                return size
        return n

    def served_shapes(self, imgsz: int | None = None,
                      frame_sizes: Sequence[tuple[int, int]] = CAMERA_FRAMES) -> list[tuple[int, int]]:
        """The model inputs a server expects most: the square input and the letterboxed ``frame_sizes`` (common
        camera frames). Warm-up tunes them and ``--backend auto`` times them."""
        shapes = {self.input_hw(imgsz)}
        for h, w in frame_sizes:
            shapes.add(self.preprocess(np.zeros((h, w, 3), np.uint8), imgsz)[0].shape[:2])
        return sorted(shapes)

    def warmup(self, max_batch: int, imgsz: int | None = None,
               frame_sizes: Sequence[tuple[int, int]] = CAMERA_FRAMES) -> None:
        """Staged path: pick batch-size buckets up to ``max_batch`` and run every bucket at the square input and at
        the letterboxed shapes of common camera frames (4:3 and 16:9 by default), with cuDNN tuning on.

        These (shape, bucket) pairs are the only ones that ever run with ``cudnn.benchmark`` (``TuningPolicy``):
        other shapes, which letterbox ``auto`` makes for other aspect ratios, run untuned rather than stall the
        device worker for a tuning run mid-stream. The host blocks of every bucket are allocated here too.
        """
        self.resolve_backend()
        if not self.staged:
            return
        sizes, size = [], 1
        while size < max_batch:
            sizes.append(size)
            size *= 2
        self.buckets = tuple(sorted(set(sizes) | {max_batch}))
        shapes = self.served_shapes(imgsz, frame_sizes)
        deepest = self._card.deepest_feature
        for hw in shapes:
            for size in self.buckets:
                self.tuning.allow(hw, size)
                images = [np.zeros((*hw, 3), np.uint8)] * size
                for _ in range(2):
                    self.collect(self.launch(images, [(deepest, "none", "float32")]))
        log.info("warmed up %s on %s for batch buckets %s at inputs %s", self.name, self.device, self.buckets,
                 ", ".join(f"{h}x{w}" for h, w in shapes))
