"""``--save DIR``: features written to disk as they arrive, readable lazily with plain numpy.

Format of a save directory (version 1; version 2 when a layer or the object vectors hold 8-bit codes, so that a
reader that predates them refuses the save instead of handing out codes as if they were features):

``meta.json``
    ``{"format": "yolostream-features", "version": 1 or 2, "complete": bool, "frames": N, "rows": R,
    "layers": {name: {"file", "dtype", "shape", "layer_index", "stride"[, "affine"]}}, ...}`` plus whatever the
    writer was given (model, source, options). ``complete`` is false until the writer closed cleanly.
``frames.jsonl``
    One JSON object per frame, in frame order: ``frame_id``, ``timestamp`` (capture time, s), ``status``
    (ok/error/dropped), ``error``, ``row`` (index of the frame in the layer arrays; null unless ok),
    ``batch_size``, ``latency_s``, ``timings_us`` and ``letterbox`` (the LetterboxInfo fields), and ``file``
    for image sources.
``<layer>.npy``
    One standard ``.npy`` per requested layer, shape ``(R, *frame_shape)`` — e.g. ``(R, C, H, W)``, or ``(R, C)``
    when pooled — in the wire dtype (float32, or float16; bfloat16 is stored as float32), one row per OK frame.
    A layer streamed as 8-bit codes (``dtype="uint8"``) keeps them: ``<layer>.npy`` holds the uint8 codes, and
    its ``affine`` entry in ``meta.json`` names two more files, ``{"scales": "<layer>.scales.npy", "offsets":
    "<layer>.offsets.npy"}``: float32 ``(R, P)``, one scale and offset per channel and row (P = C for maps, 1 for
    pooled vectors), so that row ``i`` decodes to ``offsets[i, c] + scales[i, c] * codes[i, c, ...]`` (the wire
    formula, ``yolostream.v1.wire.dequantize_affine``). :func:`load_features` gives such a layer as float32.
``objects.<column>.npy``
    Present when the stream detected objects or sent boxes: one row per box, over all frames, in frame order.
    Columns: ``boxes`` (B, 4) float32 x1, y1, x2, y2 in frame pixels; ``scores`` (B,) float32 (NaN for client
    boxes); ``classes`` (B,) int32 (-1 for client boxes); ``anchor_cells`` (B, 4) int32, the anchor that made
    each detection as (Detect level, grid row, grid column, anchor index), all -1 for client boxes (and for
    detections of a server that does not send anchors); ``box_ids`` (B,) uint64 (the client's ids;
    ``NO_BOX_ID`` = 2**64-1 where none was sent); ``features`` (B, D) object vectors, when asked for (vectors
    streamed as 8-bit codes keep them, as layers do: uint8 codes, and the column's ``affine`` entry in
    ``meta.json`` names ``objects.features.scales.npy`` and ``objects.features.offsets.npy``, float32 (F, D) with
    one row per frame that has box rows, the scale and offset of each column of that frame's vectors, in frame
    order; :func:`load_features` gives the column as float32); and
    ``frame`` (B,) int64, the index in ``frames.jsonl`` of the frame each box belongs to; on a tracked stream
    (``--track``) ``track_id`` (B,) uint64, each box's track id (0: no track), and each frame record also says its
    ``track_epoch`` (ids of two epochs are unrelated). Each frame record
    also says ``objects``: its ``[start, stop)`` box rows (null unless ok), and ``box_source``. Saves written
    before ``anchor_cells`` existed lack that file; they read as before, without the column.

Each row is appended as it arrives, so memory use does not grow with the video. The ``.npy`` header is written
first with room for any row count (numpy reserves it) and rewritten with the final count on close; a save cut
short (crash, power loss) stays readable, as :func:`load_features` then counts whole rows from the file size.
``np.load(DIR / "P3.npy", mmap_mode="r")`` works directly on a complete save.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from yolostream.v1 import wire

from .results import ANCHOR_CELL_COLUMNS, FeatureResult

FORMAT = "yolostream-features"
VERSION = 1
#: The version of saves that hold 8-bit codes (readers of version 1 would take the codes for the features).
VERSION_CODES = 2
META = "meta.json"
#: Value of ``objects.box_ids`` for boxes sent without an id, and for detections.
NO_BOX_ID = np.iinfo(np.uint64).max
#: Per-box columns of a save, in file order (``features`` only when vectors were asked for).
OBJECT_COLUMNS = ("boxes", "scores", "classes", "anchor_cells", "box_ids", "track_id", "features", "frame")
#: Value of every ``objects.anchor_cells`` column for boxes without an anchor (client boxes).
NO_ANCHOR = -1
#: Frame records are flushed to disk every this many frames.
FLUSH_EVERY = 30
FRAMES = "frames.jsonl"


def _file_name(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "layer"
    candidate, n = f"{stem}.npy", 1
    while candidate in taken or candidate in (META, FRAMES):
        candidate, n = f"{stem}_{n}.npy", n + 1
    return candidate


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header; numpy pads it so the row count can grow to 21 digits without changing size."""
    import io

    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


class _LayerFile:
    """One growing .npy file: header first, then rows appended; the header is rewritten with the final count."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.row_shape, self.rows = path, dtype, row_shape, 0
        self.header_size = len(_npy_header(dtype, (0, *row_shape)))
        self.file: IO[bytes] = open(path, "wb")
        self.file.write(_npy_header(dtype, (0, *row_shape)))

    def append(self, array: np.ndarray, rows: int = 1) -> None:
        """Append ``rows`` rows (``array`` holds exactly that many, or one row when ``rows`` is 1)."""
        self.file.write(np.ascontiguousarray(array, dtype=self.dtype).data)
        self.rows += rows

    def close(self) -> None:
        header = _npy_header(self.dtype, (self.rows, *self.row_shape))
        if len(header) != self.header_size:  # numpy reserves room for 21 digits; this cannot happen
            raise RuntimeError(f"{self.path}: the .npy header changed size")
        self.file.seek(0)
        self.file.write(header)
        self.file.close()


class FeatureWriter:
    """Appends results to a save directory (format in the module docstring); use as a context manager.

    The directory is created; an existing one must be empty, so two runs never mix. Frames whose features have a
    different shape from the layer's first row (images of different sizes with ``letterbox="auto"``) are refused
    with a ValueError: use a square letterbox or pooling for those.
    """

    def __init__(self, directory: str | Path, info: dict[str, Any] | None = None) -> None:
        self.dir = Path(directory)
        if self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
            raise FileExistsError(f"--save directory {self.dir} exists and is not empty; choose a new one")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.info = dict(info or {})
        #: per layer, its files by part: "file" (the features or the codes), and "scales", "offsets" for codes
        self.layers: dict[str, dict[str, _LayerFile]] = {}
        self.layer_meta: dict[str, dict[str, Any]] = {}
        self.objects: dict[str, _LayerFile] = {}
        #: for object vectors streamed as 8-bit codes: "scales" and "offsets", one row per frame with box rows
        self.object_params: dict[str, _LayerFile] = {}
        self.object_meta: dict[str, Any] = {}
        self.boxes = 0
        self.frames = 0
        self.rows = 0
        self._closed = False
        self._frames_file = open(self.dir / FRAMES, "w", encoding="utf-8")
        self._write_meta(complete=False)

    def _write_meta(self, complete: bool) -> None:
        coded = any("affine" in layer for layer in self.layer_meta.values()) or bool(self.object_params)
        meta = {**self.info, "format": FORMAT, "version": VERSION_CODES if coded else VERSION, "complete": complete,
                "frames": self.frames, "rows": self.rows, "layers": self.layer_meta}
        if self.object_meta:
            meta["objects"] = {**self.object_meta, "boxes": self.boxes}
        tmp = self.dir / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.dir / META)

    def _layer(self, name: str, array: np.ndarray, result: FeatureResult) -> list[tuple[_LayerFile, np.ndarray]]:
        """The files one row of layer ``name`` goes to, each with its part of the row: the features, or for 8-bit
        codes the codes, the scales and the offsets (opened, and described in meta.json, on the layer's first row)."""
        coded = result.codes.get(name)
        parts = {"file": array} if coded is None else {"file": coded.codes, "scales": coded.scales,
                                                       "offsets": coded.offsets}
        files = self.layers.get(name)
        if files is None:
            taken = {lf.path.name for group in self.layers.values() for lf in group.values()}
            files = {}
            for part, values in parts.items():
                file = _file_name(name if part == "file" else f"{name}.{part}", taken)
                taken.add(file)
                files[part] = _LayerFile(self.dir / file, values.dtype, tuple(values.shape))
            self.layers[name] = files
            info = result.tensors.get(name)
            self.layer_meta[name] = {"file": files["file"].path.name, "dtype": str(parts["file"].dtype),
                                     "shape": list(parts["file"].shape),
                                     "layer_index": info.layer_index if info else None,
                                     "stride": info.stride if info else None}
            if coded is not None:
                self.layer_meta[name]["affine"] = {part: files[part].path.name for part in ("scales", "offsets")}
            self._write_meta(complete=False)
        elif set(parts) != set(files):
            raise ValueError(f"frame {result.frame_id}: layer {name} came {'as' if coded else 'without'} 8-bit codes, "
                             f"but this save holds it {'without' if coded else 'as'} codes")
        elif tuple(array.shape) != files["file"].row_shape or parts["file"].dtype != files["file"].dtype:
            raise ValueError(f"frame {result.frame_id}: layer {name} has shape {tuple(array.shape)} "
                             f"{parts['file'].dtype}, but this save holds {files['file'].row_shape} "
                             f"{files['file'].dtype}; frames of different sizes need --letterbox square (or --pool) "
                             "to be saved together")
        return [(files[part], values) for part, values in parts.items()]

    def append(self, result: FeatureResult, **extra: Any) -> None:
        """Write one result: its features (OK frames) and its metadata line; ``extra`` adds fields to that line."""
        row = objects = None
        if result.ok:
            targets = [target for name, array in result.features.items() for target in self._layer(name, array, result)]
            columns, params = self._object_columns(result) if result.detections is not None else (None, {})
            for layer, array in targets:
                layer.append(array)
            row, self.rows = self.rows, self.rows + 1
            if columns is not None:
                n = len(result.detections)
                for name, values in columns.items():
                    self.objects[name].append(values, rows=n)
                for name, values in params.items():
                    self.object_params[name].append(values)
                objects, self.boxes = [self.boxes, self.boxes + n], self.boxes + n
        record = {"frame_id": result.frame_id, "timestamp": result.timestamp, "status": result.status,
                  "error": result.error, "row": row, "batch_size": result.batch_size, "latency_s": result.latency,
                  "timings_us": result.timings_us, "letterbox": result.letterbox, **extra}
        if result.detections is not None or self.object_meta:
            record["objects"] = objects
            record["box_source"] = result.detections.source if result.detections is not None else None
            if result.track_epoch:
                record["track_epoch"] = result.track_epoch
        self._frames_file.write(json.dumps(record) + "\n")
        self.frames += 1
        if self.frames % FLUSH_EVERY == 0:  # a killed client loses at most FLUSH_EVERY frame records
            self._frames_file.flush()

    def _object_columns(self, result: FeatureResult) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The per-box rows of one result, checked against (or opening) the object files, and for vectors streamed
        as 8-bit codes the frame's row of their scales and of their offsets (else no such row)."""
        found = result.detections
        n = len(found)
        columns = {
            "boxes": found.boxes,
            "scores": found.scores if found.scores is not None else np.full(n, np.nan, np.float32),
            "classes": found.classes if found.classes is not None else np.full(n, -1, np.int32),
            "anchor_cells": (found.anchor_cells if found.anchor_cells is not None
                             else np.full((n, len(ANCHOR_CELL_COLUMNS)), NO_ANCHOR, np.int32)),
            "box_ids": found.box_ids if found.box_ids is not None else np.full(n, NO_BOX_ID, np.uint64),
            "frame": np.full(n, self.frames, np.int64),
        }
        if found.track_ids is not None:
            columns["track_id"] = found.track_ids
        coded = result.codes.get(wire.OBJECT_FEATURES_NAME)
        params = {} if coded is None else {"scales": coded.scales, "offsets": coded.offsets}
        if result.object_features is not None:
            columns["features"] = result.object_features if coded is None else coded.codes
        dtypes = {"boxes": np.float32, "scores": np.float32, "classes": np.int32, "anchor_cells": np.int32,
                  "box_ids": np.uint64, "track_id": np.uint64, "frame": np.int64}
        columns = {k: np.asarray(v, dtype=dtypes.get(k, np.asarray(v).dtype)) for k, v in columns.items()}
        if not self.objects:
            for name in (c for c in OBJECT_COLUMNS if c in columns):
                array = columns[name]
                file = f"objects.{name}.npy"
                self.objects[name] = _LayerFile(self.dir / file, array.dtype, tuple(array.shape[1:]))
                self.object_meta.setdefault("columns", {})[name] = {"file": file, "dtype": str(array.dtype),
                                                                    "shape": list(array.shape[1:])}
            for part, values in params.items():
                file = f"objects.features.{part}.npy"
                self.object_params[part] = _LayerFile(self.dir / file, values.dtype, tuple(values.shape))
                self.object_meta["columns"]["features"].setdefault("affine", {})[part] = file
            self.object_meta["slices"] = {k: list(v) for k, v in found.slices.items()}
            self._write_meta(complete=False)
        if set(columns) != set(self.objects):
            raise ValueError(f"frame {result.frame_id}: object columns {sorted(columns)} differ from this save's "
                             f"{sorted(self.objects)}")
        if bool(params) != bool(self.object_params):
            raise ValueError(f"frame {result.frame_id}: object features came {'as' if params else 'without'} 8-bit "
                             f"codes, but this save holds them {'without' if params else 'as'} codes")
        for name, array in columns.items():
            if tuple(array.shape[1:]) != self.objects[name].row_shape:
                raise ValueError(f"frame {result.frame_id}: object {name} rows of shape {tuple(array.shape[1:])}, "
                                 f"but this save holds {self.objects[name].row_shape}")
        return columns, params

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._frames_file.close()  # frame records first: a layer header never counts rows they do not describe
        for layer in [*(lf for group in self.layers.values() for lf in group.values()), *self.objects.values(),
                      *self.object_params.values()]:
            layer.close()
        self._write_meta(complete=True)

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, eq=False)
class CodedRows:
    """The saved rows of a layer streamed as 8-bit codes, read as float32: each row is decoded when it is indexed.

    ``saved["P3"][i]`` (or a slice, or any numpy index whose first entry picks rows) gives float32 values, exactly
    what the stream's ``result.features`` held; ``np.asarray(saved["P3"])`` decodes every row. ``shape``, ``dtype``
    (float32), ``ndim`` and ``len()`` are those of the decoded array. The codes stay on disk, memory-mapped:
    ``codes`` (rows, *shape) uint8, ``scales`` and ``offsets`` (rows, P) float32, and ``row(i)`` gives row ``i`` as a
    ``yolostream.v1.wire.AffineCodes``.

    Object vectors saved as codes (``saved.objects["features"]``) are rows of boxes, and a frame's boxes share one
    row of parameters (one scale and offset per column, as the frame's (N, D) tensor was coded): ``groups`` (rows,)
    then gives each box's row of ``scales`` and ``offsets``, and ``row(i)`` is box ``i``'s (D,) codes with one
    channel per element (axis 0). ``groups`` is None for layers, whose every row has its own parameters.
    """

    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray
    groups: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.codes)

    def head(self, rows: int) -> "CodedRows":
        """The first ``rows`` rows, still coded."""
        if self.groups is not None:
            return CodedRows(self.codes[:rows], self.scales, self.offsets, self.groups[:rows])
        return CodedRows(self.codes[:rows], self.scales[:rows], self.offsets[:rows])

    def row(self, i: int) -> wire.AffineCodes:
        """Row ``i``'s codes and parameters, as the stream delivered them (``result.codes[name]``; for object vectors
        box ``i``'s row of its frame's codes, with its frame's per-column parameters)."""
        if self.groups is not None:
            g = int(self.groups[i])
            return wire.AffineCodes(np.asarray(self.codes[i]), np.asarray(self.scales[g]), np.asarray(self.offsets[g]),
                                    0)
        return wire.AffineCodes(np.asarray(self.codes[i]), np.asarray(self.scales[i]), np.asarray(self.offsets[i]),
                                wire.affine_channel_axis(self.codes.ndim - 1))

    def __getitem__(self, index: Any) -> np.ndarray:
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
        if first is Ellipsis or first is None:
            return np.asarray(self)[index]
        if isinstance(first, (int, np.integer)):
            values = self.row(int(np.arange(len(self))[first])).dequantize()
            return values[rest] if rest else values
        picked = np.arange(len(self))[first]
        values = np.empty((len(picked), *self.shape[1:]), np.float32)
        if self.groups is None:
            for k, i in enumerate(picked):
                values[k] = self.row(int(i)).dequantize()
        else:  # a frame's boxes at once: one lookup table per frame, not per box
            groups = np.asarray(self.groups)[picked]
            for g in np.unique(groups):
                mask = groups == g
                values[mask] = wire.dequantize_affine(np.asarray(self.codes[picked[mask]]), self.scales[g],
                                                      self.offsets[g], 1)
        return values[(slice(None), *rest)]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        values = self[:]
        return values if dtype is None else values.astype(dtype, copy=False)


@dataclass(eq=False)
class SavedFeatures(Mapping[str, "np.ndarray | CodedRows"]):
    """A save directory read back, as a mapping of layer name → read-only memory-mapped (rows, ...) array (a
    :class:`CodedRows`, read as float32, for a layer streamed as 8-bit codes).

    Row ``i`` of every array belongs to the frame whose metadata has ``row == i``; ``frames`` lists every frame's
    metadata in order. ``objects`` maps each per-box column (``boxes``, ``scores``, ``classes``,
    ``anchor_cells``, ``box_ids``, ``features``, ``frame``; see the module docstring) to its memory-mapped array (a
    :class:`CodedRows`, read as float32, for ``features`` streamed as 8-bit codes), empty when the stream had no
    boxes; ``objects["frame"][k]`` is the index in ``frames`` of box ``k``'s frame. Being a real Mapping, ``"P3" in saved``, ``len(saved)``, ``saved.items()`` and
    ``dict(saved)`` work as they do on the ``features`` dict it wraps; equality stays identity, as comparing
    arrays element-wise has no single truth value.
    """

    path: Path
    meta: dict[str, Any]
    frames: list[dict[str, Any]]
    features: dict[str, np.ndarray | CodedRows]
    objects: dict[str, np.ndarray | CodedRows] = field(default_factory=dict)

    def __getitem__(self, layer: str) -> np.ndarray | CodedRows:
        return self.features[layer]

    def __iter__(self) -> Iterator[str]:
        return iter(self.features)

    def __len__(self) -> int:
        return len(self.features)

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @property
    def frame_ids(self) -> np.ndarray:
        """The frame id of each row of the layer arrays."""
        return np.array([f["frame_id"] for f in self.frames if f["row"] is not None], dtype=np.int64)


def _read_frames(path: Path) -> list[dict[str, Any]]:
    frames = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):  # the last line of an interrupted save may be cut short
                break
            frames.append(json.loads(line))
    return frames


def _open_rows(path: Path, rows_hint: int) -> np.ndarray:
    """Memory-map a layer file, counting whole rows from its size when the header was never finalised."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran_order, dtype = read_header(f)
        offset = f.tell()
    row_shape = tuple(shape[1:])
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    available = (path.stat().st_size - offset) // row_bytes if row_bytes else 0
    # Never more rows than the file holds, nor than the frame records describe (a save cut short may have a
    # header or data ahead of its records).
    count = min(shape[0] or available, available, rows_hint)
    if count == 0:
        return np.empty((0, *row_shape), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count, *row_shape))


def _open_layer(directory: Path, layer: dict[str, Any], rows_hint: int) -> np.ndarray | CodedRows:
    """A layer's rows: its memory-mapped file, or for 8-bit codes the three files as :class:`CodedRows` (cut to the
    rows all three hold, for a save cut short)."""
    codes = _open_rows(directory / layer["file"], rows_hint)
    if "affine" not in layer:
        return codes
    scales = _open_rows(directory / layer["affine"]["scales"], rows_hint)
    offsets = _open_rows(directory / layer["affine"]["offsets"], rows_hint)
    return CodedRows(codes, scales, offsets).head(min(len(codes), len(scales), len(offsets)))


def load_features(path: str | Path) -> SavedFeatures:
    """Read a save directory written by ``yolostream stream --save`` / :class:`FeatureWriter`, lazily.

    Layer arrays are memory-mapped, so only the rows you touch are read; a layer saved as 8-bit codes is a
    :class:`CodedRows`, which decodes the rows you index to float32. A save cut short is read up to its last whole
    row. Saves of format version 1 and 2 are read.
    """
    directory = Path(path)
    meta_path = directory / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a yolostream feature save (no {META})")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("version") not in (VERSION, VERSION_CODES):
        raise ValueError(f"{directory}: unsupported save format {meta.get('format')!r} version {meta.get('version')!r}")
    frames = _read_frames(directory / FRAMES)
    rows = sum(1 for f in frames if f["row"] is not None)
    features = {name: _open_layer(directory, layer, rows) for name, layer in meta["layers"].items()}
    columns = meta.get("objects", {}).get("columns", {})
    boxes = max((f["objects"][1] for f in frames if f.get("objects")), default=0)
    objects = {name: _open_rows(directory / column["file"], boxes) for name, column in columns.items()}
    coded = columns.get("features", {}).get("affine", {})
    with_boxes = sum(1 for f in frames if f.get("objects"))
    params = {part: _open_rows(directory / file, with_boxes) for part, file in coded.items()}
    if not meta.get("complete"):
        # cut short: keep the frames whose rows reached every layer file, whose boxes reached every object file and
        # whose row of object codes' parameters (when there are some) reached theirs, and only those rows
        whole = min((len(a) for a in features.values()), default=rows)
        whole_boxes = min((len(a) for a in objects.values()), default=boxes)
        whole_params = min((len(a) for a in params.values()), default=with_boxes)
        cut, seen = len(frames), 0
        for i, f in enumerate(frames):
            if ((f["row"] is not None and f["row"] >= whole)
                    or (f.get("objects") and (f["objects"][1] > whole_boxes or seen >= whole_params))):
                cut = i
                break
            seen += 1 if f.get("objects") else 0
        frames = frames[:cut]
        features = {name: a.head(whole) if isinstance(a, CodedRows) else a[:whole] for name, a in features.items()}
        kept = max((f["objects"][1] for f in frames if f.get("objects")), default=0)
        objects = {name: a[:kept] for name, a in objects.items()}
    if params:
        objects["features"] = _coded_objects(objects["features"], params, frames)
    return SavedFeatures(directory, meta, frames, features, objects)


def _coded_objects(codes: np.ndarray, params: dict[str, np.ndarray], frames: list[dict[str, Any]]) -> CodedRows:
    """The object vectors of a save as :class:`CodedRows`: box rows of codes, each with the parameter row of its frame
    (the k-th frame that has box rows owns the k-th row; its boxes are its ``objects`` range)."""
    spans = [f["objects"] for f in frames if f.get("objects")]
    groups = np.repeat(np.arange(len(spans), dtype=np.int64), [stop - start for start, stop in spans])
    return CodedRows(codes[:len(groups)], params["scales"], params["offsets"], groups[:len(codes)])
