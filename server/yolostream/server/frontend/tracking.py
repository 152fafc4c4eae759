"""A stream's tracking options (``StreamConfig.tracking``), validated, and a frame's objects given to its tracker.

Tracking runs in the front-end, per stream, on the boxes the frame's reply carries: its detections, or the client's
own boxes (with ``Frame.box_scores``, or all high-scoring without). Vectors are the frame's object vectors: those
the stream chose; ``TRACKING_VECTORS`` when it chose none (they are then its object features), or, when it asked
for no vectors (mode NONE), ``TRACKING_VECTORS`` computed for the tracker alone and not sent.
Frames are given to the tracker in frame order (the stream's writer completes them in order); frames answered
ERROR or DROPPED never reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import wire

from .tracker import Tracker, TrackerOptions

#: Tracks held per stream when the stream does not say, and the most it may ask for: each costs about 4·D + 250
#: bytes (about 1.2 KB with the default vectors), so a front-end's streams stay bounded.
DEFAULT_MAX_TRACKS = 256
MAX_TRACKS = 1024
#: The object vectors tracking uses when the stream asks for none: anchor mode on layers 2, 4 and 6, normalised.
#: Measured in bench/tracking_bench.py: the best IDF1 through crossings of the choices tried (anchor and roi; P3-P5,
#: 2,4,6 and both), on a checkpoint with random weights; early layers still separate textures there, where the deep
#: ones collapse toward one direction. Rerun the bench with trained weights before relying on it.
TRACKING_VECTORS = ("2", "4", "6")


@dataclass(frozen=True)
class StreamTracking:
    """A stream's validated tracking settings. ``first_epoch``: the epoch its tracker's state reports."""

    options: TrackerOptions
    return_vectors: bool
    first_epoch: int

    def tracker(self) -> Tracker:
        """A new tracker for one stream (its state is freed with it, when the stream ends)."""
        return Tracker(self.options)


def tracking_options(msg: pb.TrackingOptions) -> StreamTracking | None:
    """The stream's tracking, or None when not enabled; ValueError names the field (``tracking.<name>``).

    Args:
        msg: ``StreamConfig.tracking``; unset fields take the tracker's defaults.
    """
    if not msg.enabled:
        return None
    # The ``optional`` fields the stream set are the tracker's options of the same names (a synthetic oneof each).
    values: dict[str, float | int] = {field.name: value for field, value in msg.ListFields()
                                      if field.containing_oneof is not None}
    if msg.max_tracks > MAX_TRACKS:
        raise ValueError(f"tracking.max_tracks {msg.max_tracks} is over the server's limit: choose 1..{MAX_TRACKS} "
                         f"(or 0 for the default {DEFAULT_MAX_TRACKS})")
    values["max_tracks"] = msg.max_tracks or DEFAULT_MAX_TRACKS
    if "high_score" in values and "new_track_score" not in values:  # keep new_track_score >= high_score
        values["new_track_score"] = max(TrackerOptions.new_track_score, values["high_score"])
    if "high_score" in values and "low_score" not in values:
        values["low_score"] = min(TrackerOptions.low_score, values["high_score"])
    if msg.previous_epoch >= 2**32 - 1:
        raise ValueError("tracking.previous_epoch is the largest epoch there is: start a new stream without it")
    try:
        options = TrackerOptions(**values)
    except ValueError as err:
        raise ValueError(f"tracking.{err}") from None
    return StreamTracking(options, bool(msg.return_vectors), int(msg.previous_epoch) + 1)


def track_frame(result: pb.FrameResult, tracker: Tracker, tracking: StreamTracking, boxes: np.ndarray,
                scores: np.ndarray | None, vectors: np.ndarray | None) -> None:
    """Advance ``tracker`` by one frame and write its answer into ``result`` (track ids, new flags, epoch, and the
    track vectors when asked).

    Args:
        result: the frame's reply, whose boxes are ``boxes`` in the same order.
        tracker: the stream's tracker.
        tracking: the stream's settings.
        boxes: (N, 4) float32, original-frame pixels.
        scores: (N,) detection or client scores, or None (every box counts as high-scoring).
        vectors: (N, D) float32 object vectors, or None.
    """
    update = tracker.update(boxes, scores, vectors, return_vectors=tracking.return_vectors)
    result.track_ids[:] = update.ids.tolist()
    result.track_new[:] = update.new.tolist()
    result.track_epoch = tracking.first_epoch + update.epoch - 1
    if update.vectors is not None:
        wire.fill_tensor(result.track_features, "track", -1, 0, update.vectors, pb.DTYPE_FLOAT32)
