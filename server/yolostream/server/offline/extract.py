"""Offline extraction: images and videos in, one ``.npz`` of features per image or video frame out, no server.

Built on ``FeatureExtractor.extract`` (the numpy API of the library), so the command, the library and the server
share one truncated forward and one letterbox.

File format (documented in the README): one float32 array per requested layer, keyed by the name as requested
(``all`` → layer indices as strings), shape (C, H, W), plus ``meta_*`` entries: ``meta_ratio`` (rw, rh),
``meta_pad`` (left, top, right, bottom), ``meta_orig_hw``, ``meta_input_hw``, ``meta_frame`` (index within the
source), ``meta_model`` and ``meta_random_weights``. A feature cell (y, x) of a stride-s layer covers model-input
pixels [x·s, (x+1)·s) × [y·s, (y+1)·s); a model-input point maps back to the image with the formula of
``yolostream.v1.vocab.input_to_frame``: x_orig = (x_input − pad_left) · original_width / resized_width, where
resized_width = input_width − pad_left − pad_right, and likewise for y.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import cv2
import numpy as np
import torch
from tqdm import tqdm

from yolostream.v1.vocab import IMAGE_SUFFIXES

from ..model.onnx_io import OnnxPlan, Positional, onnx_bytes, session
from .extractor import FeatureExtractor, ImageFeatures

log = logging.getLogger(__name__)

T = TypeVar("T")



@dataclass(frozen=True)
class Source:
    """One input: an image file, or a video read frame by frame."""

    path: Path
    is_video: bool


def collect_sources(inputs: Sequence[str | Path]) -> list[Source]:
    """Expand inputs (files or folders of images) and refuse two inputs that would write the same output name."""
    sources: list[Source] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise ValueError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            sources.extend(Source(p, False) for p in images)
        elif path.is_file():
            sources.append(Source(path, path.suffix.lower() not in IMAGE_SUFFIXES))
        else:
            raise FileNotFoundError(f"input not found: {path}")
    stems: dict[str, Path] = {}
    for s in sources:
        if s.path.stem in stems and stems[s.path.stem] != s.path:
            raise ValueError(f"inputs {stems[s.path.stem]} and {s.path} would both write {s.path.stem}*.npz")
        stems[s.path.stem] = s.path
    return sources


def read_image(path: Path) -> np.ndarray:
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        raise ValueError(f"cannot decode image {path}")
    return frame


def iter_video(path: Path, max_frames: int | None = None) -> tuple[int | None, Iterator[np.ndarray]]:
    """Open a video; return its frame count (None when unknown) and a frame iterator that releases the capture."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise ValueError(f"cannot open {path} as an image or a video")
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    total = count if count > 0 else None
    if max_frames is not None:
        total = min(total, max_frames) if total is not None else max_frames

    def frames() -> Iterator[np.ndarray]:
        try:
            n = 0
            while max_frames is None or n < max_frames:
                ok, frame = cap.read()
                if not ok:
                    return
                n += 1
                yield frame
        finally:
            cap.release()

    return total, frames()


def write_npz(path: Path, result: ImageFeatures, frame_index: int, model_name: str, random_weights: bool) -> None:
    """Write one image's features and letterbox metadata (the README's format) atomically: a crash leaves no half file."""
    lb = result.letterbox
    arrays = {str(name): np.ascontiguousarray(a, dtype=np.float32) for name, a in result.features.items()}
    arrays.update(
        meta_ratio=np.asarray(lb.ratio, dtype=np.float64),
        meta_pad=np.asarray([lb.pad_left, lb.pad_top, lb.pad_right, lb.pad_bottom], dtype=np.int32),
        meta_orig_hw=np.asarray(lb.orig_hw, dtype=np.int32),
        meta_input_hw=np.asarray(lb.out_hw, dtype=np.int32),
        meta_frame=np.asarray(frame_index, dtype=np.int64),
        meta_model=np.asarray(model_name),
        meta_random_weights=np.asarray(random_weights),
    )
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    tmp.replace(path)


def onnxruntime_forward(extractor: FeatureExtractor, device: torch.device) -> Callable[[torch.Tensor], dict]:
    """The extractor's own forward as one ONNX Runtime session (batch, height and width symbolic): what
    ``FeatureExtractor.extract(forward=...)`` runs for ``extract --backend onnxruntime``. Outputs keep the
    extractor's keys and come back as torch tensors on the CPU.

    Args:
        extractor: the (frozen) extractor to export.
        device: where the session runs (picks the providers).
    """
    weight = next(extractor.parameters())
    side = 2 * extractor.stride
    example = torch.zeros((1, 3, side, side), dtype=weight.dtype, device=weight.device)
    with torch.inference_mode():
        keys = list(extractor(example))
    sess = session(onnx_bytes(Positional(extractor, keys).eval(), example, len(keys), "shape"), device)
    return OnnxPlan(sess, keys, torch.device("cpu")).by_index


def run_extract(
    extractor: FeatureExtractor,
    inputs: Sequence[str | Path],
    out_dir: Path,
    *,
    imgsz: int | None = None,
    policy: str = "auto",
    max_frames: int | None = None,
    batch: int = 8,
    progress: bool | None = None,
    forward: Callable[[torch.Tensor], dict] | None = None,
) -> list[Path]:
    """Extract the extractor's layers for every image and video frame in ``inputs``; return the files written.

    Args:
        extractor: the model and the layers to write (keys of the .npz files are its output names).
        inputs: image files, folders of images, or video files.
        out_dir: where ``<stem>.npz`` and ``<stem>_<frame:06d>.npz`` go (created if needed).
        imgsz: model input size (default: the extractor's); policy: the letterbox policy (``auto`` or ``square``).
        max_frames: stop each video after this many frames; batch: images or frames per forward.
        progress: show a progress bar (None: only on a terminal).
        forward: what runs each batch (default: the extractor itself; see ``onnxruntime_forward``).
    """
    sources = collect_sources(inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    bar = tqdm(total=0, unit="frame", disable=(not progress) if progress is not None else None)
    chunk: list[tuple[np.ndarray, Path, int]] = []
    for item in _then_flush(_frames(sources, out_dir, max_frames, bar)):
        if item is not None:
            chunk.append(item)
        if chunk and (item is None or len(chunk) >= batch):
            results = extractor.extract([frame for frame, _, _ in chunk], imgsz=imgsz, letterbox=policy,
                                        batch_size=batch, forward=forward)
            for (_, path, index), result in zip(chunk, results):
                write_npz(path, result, index, extractor.model_name, extractor.random_weights)
                written.append(path)
            bar.update(len(chunk))
            chunk = []
    bar.close()
    return written


def _frames(sources: Sequence[Source], out_dir: Path, max_frames: int | None,
            bar: tqdm) -> Iterator[tuple[np.ndarray, Path, int]]:
    """Every frame to extract, in input order, with its output file and its index within its source.

    One stream over all sources, so that a folder of images is batched like the frames of a video.
    """
    for source in sources:
        bar.set_description(source.path.name)
        if not source.is_video:
            bar.total += 1
            yield read_image(source.path), out_dir / f"{source.path.stem}.npz", 0
            continue
        total, frames = iter_video(source.path, max_frames)
        bar.total += total or 0
        count = 0
        for count, frame in enumerate(frames, 1):
            yield frame, out_dir / f"{source.path.stem}_{count - 1:06d}.npz", count - 1
        if count == 0:
            raise ValueError(f"{source.path}: no frames could be read")


def _then_flush(frames: Iterator[T]) -> Iterator[T | None]:
    """Yield every frame, then one None so the caller flushes its last partial batch."""
    yield from frames
    yield None
