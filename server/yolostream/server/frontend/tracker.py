"""A per-stream multi-object tracker for the front-end processes: ByteTrack's two-stage association on a
constant-velocity Kalman filter, with appearance from the per-object vectors of the same forward.

Torch-free and gRPC-free (numpy, and scipy's ``linear_sum_assignment``), so it runs in a front-end next to the
stream it serves: one :class:`Tracker` per stream, fed each frame's boxes, scores and vectors in frame order.
Re-implemented from the published descriptions: ByteTrack (Zhang et al., ECCV 2022) for the two-stage
association, BoT-SORT (Aharon et al., 2022) for fusing appearance with IoU and for the Kalman state (cx, cy, w, h),
DeepSORT (Wojke et al., 2017) for the noise model and the appearance moving average.

How one :meth:`Tracker.update` works:

1. Every track's box is predicted one frame ahead (several with ``frames_elapsed``). With diagonal process and
   measurement noise and a diagonal start, the 8×8 constant-velocity filter splits exactly into four independent
   (position, velocity) 2×2 filters per track, run as element-wise numpy over all tracks at once.
2. Boxes scoring at least ``high_score`` are matched to the confirmed tracks (tracking or lost). A pair is allowed
   when its IoU with the predicted box is at least ``match_iou``; its cost is 1 − IoU, moved by appearance by at
   most ``appearance_weight`` (down when the vectors say "same object", up when they say "different").
3. Boxes between ``low_score`` and ``high_score`` are matched on IoU alone (at least ``low_match_iou``) to the
   tracks tracked on the previous frame and still unmatched: they carry a track through partial occlusion and never
   start one.
4. High boxes left are matched (as in 2) to the tentative tracks; a tentative track that misses a frame is dropped.
5. Boxes left (high or low) are matched to lost tracks on appearance alone (re-identification): within
   ``reid_radius`` track heights of where the track was last seen or is predicted, with a similar height, and only
   when the vectors are at least e^``reid_confidence`` times likelier to come from the same object than from two
   different ones. This is what brings an identity back after an occlusion long enough for the motion model to
   lose it (objects that stop, turn or walk together while hidden).
6. High boxes still left, scoring at least ``new_track_score``, start tracks (highest score first) while fewer than
   ``max_tracks`` tracks are held. A track is confirmed, and gets its id, once matched on ``min_hits`` frames in a
   row; on the first frame of an epoch at once, as ByteTrack does, so the first frame is tracked.
7. Tracks unmatched for more than ``max_lost`` frames are deleted.

Each stage's assignment is optimal (Hungarian) with a rejection cost: a pair is kept only when its cost is under the
stage's limit, and leaving a box and a track both unmatched beats any pair over it.

Appearance is self-calibrating, so vectors that cannot tell objects apart do no harm:

- Vectors are L2-normalised. With ``center_vectors`` (default) they are compared after subtracting the stream's
  running mean vector and normalising again: what all objects share carries no identity, and vectors that are
  nearly the same for every object become noise, far apart from each other.
- A track's vector is an exponential moving average (``vector_smoothing``) of its high-score boxes' vectors.
- The tracker learns, per stream, how far apart the vectors of one object are (a box and its track, in confident
  matches: one track and one box overlapping by IoU ≥ 0.5 with nothing else near) and how far apart those of
  different objects are (the same box against another track). From the two running means and variances a
  distance becomes a log-likelihood ratio "same vs different" (two Gaussians with a pooled variance). Appearance
  acts only after ``_CALIBRATION_SAMPLES`` samples of each and while the two means are in the right order; when the
  distributions overlap the ratio stays near zero, so collapsed or random vectors leave IoU-only tracking
  unchanged (measured in bench/tracking_bench.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["NO_TRACK", "TrackerOptions", "TrackUpdate", "Tracker"]

#: The id of a box that got no confirmed track: under ``low_score``, a low box that matched nothing, a box whose
#: new track is not confirmed yet, or a new box while ``max_tracks`` tracks are held. Real ids start at 1.
NO_TRACK = 0

#: Kalman noise, as fractions of the box's width or height (DeepSORT's weights, applied to w and h separately as
#: BoT-SORT does): the position's standard deviation per frame, and the velocity's.
_STD_POSITION = 1.0 / 20.0
_STD_VELOCITY = 1.0 / 160.0

#: The running mean vector (``center_vectors``) averages all vectors until this many were seen, then becomes an
#: exponential average over about this many, so it follows a scene that changes slowly.
_MEAN_HORIZON = 1000

#: Appearance acts once this many distances of each kind (same object, different objects) were learnt; the running
#: statistics average over about ``_CALIBRATION_HORIZON`` samples, taking at most ``_CALIBRATION_PER_FRAME`` a frame.
_CALIBRATION_SAMPLES = 10
_CALIBRATION_HORIZON = 2000
_CALIBRATION_PER_FRAME = 4
_CALIBRATION_WARM = 200

#: The running mean vector (once ``_MEAN_HORIZON`` vectors are in it) and the appearance statistics (once
#: ``_CALIBRATION_WARM`` samples of each kind are) learn on every ``_SLOW_EVERY``-th frame only: both move slowly,
#: and learning costs CPU on every frame.
_SLOW_EVERY = 4

#: Re-identification also wants the box's height within this factor of the track's last seen height.
_REID_HEIGHT_RATIO = 1.6

#: A centred vector shorter than this (squared) sits on the mean: it carries nothing and counts as no vector.
_MIN_CENTRED_NORM2 = 1e-6

#: Which size scales the noise of each coordinate (cx, cy, w, h): w, h, w, h.
_SIZE_OF = np.array([2, 3, 2, 3])

#: The per-track arrays, one row per track, kept in step.
_TRACK_ARRAYS = ("_ids", "_state", "_hits", "_missed", "_x", "_v", "_pxx", "_pxv", "_pvv", "_last", "_vec",
                 "_has_vec")

#: States of a track.
_TENTATIVE, _TRACKED, _LOST = 0, 1, 2

_EPS = 1e-12


@dataclass(frozen=True)
class TrackerOptions:
    """The tracker's settings; an invalid value raises ValueError naming the field.

    Args:
        high_score: boxes scoring at least this take part in the first association and may start tracks.
        low_score: boxes scoring at least this but under ``high_score`` can only extend a track that was tracked on
            the previous frame, or bring back a lost one by appearance; lower ones are ignored. At most
            ``high_score``.
        new_track_score: a high box left unmatched starts a track only when it scores at least this. At least
            ``high_score``.
        match_iou: the least IoU with a track's predicted box for a high box to match it (ByteTrack's 0.2).
        low_match_iou: the least IoU for a low box to match (ByteTrack's 0.5).
        appearance_weight: how far appearance may move a pair's cost (1 − IoU), in [0, 1]: down for vectors that
            look like the same object, up for different ones, in proportion to how sure the learnt statistics are.
            0 is IoU-only ByteTrack (and turns re-identification off).
        appearance_threshold: the largest cosine distance (after centring), in [0, 2], at which appearance may count
            in a pair's favour (lower its cost, or re-identify); a guard on top of the learnt statistics.
        reid_radius: how far, in track heights, a lost track is looked for by appearance; 0 turns
            re-identification off.
        reid_confidence: the log-likelihood ratio (same object against different objects) a lost track's
            re-identification needs, ≥ 0; 2 means about 7 to 1.
        vector_smoothing: a track's vector after a match is ``s * track + (1 - s) * box``, normalised again; in
            [0, 1), 0 keeps only the newest box's vector.
        center_vectors: compare vectors after subtracting the stream's running mean vector (see the module
            docstring).
        max_lost: how many frames an unmatched track is kept (and can be found again) before it is deleted.
        min_hits: matched frames in a row before a new track is confirmed and gets an id (1: at once).
        max_tracks: the most tracks (tracking, lost and tentative together) held at once. New tracks start only in
            the room left, highest-scoring boxes first; the others get ``NO_TRACK`` (existing tracks are never
            pushed out: they end by ``max_lost``). Bounds the tracker's memory to about ``max_tracks × (4·D + 250)``
            bytes for D-wide vectors.
    """

    high_score: float = 0.5
    low_score: float = 0.1
    new_track_score: float = 0.6
    match_iou: float = 0.2
    low_match_iou: float = 0.5
    appearance_weight: float = 0.5
    appearance_threshold: float = 0.7
    reid_radius: float = 1.5
    reid_confidence: float = 2.0
    vector_smoothing: float = 0.9
    center_vectors: bool = True
    max_lost: int = 30
    min_hits: int = 2
    max_tracks: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, (bool, np.bool_)):
                    raise ValueError(f"{f.name} must be True or False, got {value!r}")
            elif f.type == "int":
                if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                    raise ValueError(f"{f.name} must be an integer, got {value!r}")
            elif isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            elif not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        ranges = {"high_score": (0.0, 1.0), "low_score": (0.0, 1.0), "new_track_score": (0.0, 1.0),
                  "match_iou": (0.0, 1.0), "low_match_iou": (0.0, 1.0), "appearance_weight": (0.0, 1.0),
                  "appearance_threshold": (0.0, 2.0), "reid_radius": (0.0, 100.0), "reid_confidence": (0.0, 100.0),
                  "max_lost": (0, 100_000), "min_hits": (1, 1000), "max_tracks": (1, 1_000_000)}
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
        if not 0.0 <= self.vector_smoothing < 1.0:
            raise ValueError(f"vector_smoothing must be in [0, 1), got {self.vector_smoothing!r}")
        if self.low_score > self.high_score:
            raise ValueError(f"low_score must be at most high_score ({self.high_score}), got {self.low_score!r}")
        if self.new_track_score < self.high_score:
            raise ValueError(f"new_track_score must be at least high_score ({self.high_score}), "
                             f"got {self.new_track_score!r}")


@dataclass(frozen=True)
class TrackUpdate:
    """What :meth:`Tracker.update` says about one frame's boxes: one row per input box, in input order.

    Attributes:
        ids: (N,) uint64 track ids, stable within the stream and never reused (not even across ``reset``);
            ``NO_TRACK`` (0) for a box without a confirmed track.
        new: (N,) bool, True where the box's track was confirmed on this frame (its id is new).
        vectors: (N, D) float32, each box's track vector (unit length, after this frame's update; zeros where the
            id is ``NO_TRACK`` or the track has no vector yet); None unless asked for and vectors were given.
        epoch: the tracker's epoch when the frame was tracked (see :meth:`Tracker.reset`).
    """

    ids: np.ndarray
    new: np.ndarray
    vectors: np.ndarray | None
    epoch: int


class _Appearance(NamedTuple):
    """One frame's vectors as the association stages need them (see ``Tracker._appearance``)."""

    unit: np.ndarray
    det_ok: np.ndarray
    det_m: np.ndarray
    det_n2: np.ndarray
    track_ok: np.ndarray
    track_m: np.ndarray
    track_n2: np.ndarray
    mm: float
    #: Whether the same/different statistics are learnt well enough to act on.
    calibrated: bool


class Tracker:
    """One stream's tracker. Not thread-safe: feed it one frame at a time, in frame order.

    Args:
        options: its settings (default ``TrackerOptions()``).
    """

    def __init__(self, options: TrackerOptions | None = None) -> None:
        self.options = options if options is not None else TrackerOptions()
        #: Goes up by one on every :meth:`reset` (the first epoch is 1).
        self.epoch = 0
        self._next_id = 1
        self.reset()

    def reset(self) -> None:
        """Forget every track, the running mean vector and the learnt appearance statistics; start a new epoch.

        Ids go on counting from where they were, so an id is never reused within the tracker's life; the epoch
        tells a client that no track of an earlier epoch will be continued.
        """
        self.epoch += 1
        #: Frames tracked in this epoch.
        self.frames = 0
        self._dim: int | None = None
        self._ids = np.zeros(0, np.uint64)
        self._state = np.zeros(0, np.int8)
        self._hits = np.zeros(0, np.int32)
        self._missed = np.zeros(0, np.int32)
        self._x = np.zeros((0, 4))
        self._v = np.zeros((0, 4))
        self._pxx = np.zeros((0, 4))
        self._pxv = np.zeros((0, 4))
        self._pvv = np.zeros((0, 4))
        self._last = np.zeros((0, 4))
        self._vec = np.zeros((0, 0), np.float32)
        self._has_vec = np.zeros(0, bool)
        self._mean: np.ndarray | None = None
        self._seen = 0
        # Running [count, mean, variance] of appearance distances: same object, different objects.
        self._same = [0, 0.0, 0.0]
        self._diff = [0, 0.0, 0.0]

    def __len__(self) -> int:
        """How many tracks are held: tracking, lost and tentative."""
        return len(self._ids)

    @property
    def next_id(self) -> int:
        """The id the next confirmed track will get."""
        return self._next_id

    def update(self, boxes: np.ndarray, scores: np.ndarray | None = None, vectors: np.ndarray | None = None, *,
               frames_elapsed: int = 1, return_vectors: bool = False) -> TrackUpdate:
        """Track one frame's boxes.

        Args:
            boxes: (N, 4) x1, y1, x2, y2 in original-frame pixels. Rows that are not finite, or with x2 ≤ x1 or
                y2 ≤ y1, get no track.
            scores: (N,) detection scores, or None: every box counts as high-score (client boxes). A NaN score gets
                no track.
            vectors: (N, D) per-box appearance vectors (any scale: they are L2-normalised here), or None. D must
                stay the same within an epoch. A row that is not finite or is all zeros counts as no vector.
            frames_elapsed: frames since the previous update (more than 1 when frames were dropped): the motion
                model moves this many frames ahead and unmatched tracks age by it.
            return_vectors: also return each box's track vector.

        Returns:
            The boxes' ids, new-track flags and (optionally) track vectors, in input order.

        Raises:
            ValueError: on shapes that do not agree, a vector width that changed within the epoch, or
                ``frames_elapsed`` < 1.
        """
        opt = self.options
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
        n = len(boxes)
        if scores is None:
            score = np.ones(n)
        else:
            score = np.asarray(scores, dtype=np.float64)
            if score.shape != (n,):
                raise ValueError(f"scores must have shape ({n},), got {score.shape}")
        if isinstance(frames_elapsed, (bool, np.bool_)) or not isinstance(frames_elapsed, (int, np.integer)) \
                or frames_elapsed < 1:
            raise ValueError(f"frames_elapsed must be an integer of at least 1, got {frames_elapsed!r}")
        steps = int(frames_elapsed)
        unit, unit_has = self._unit_vectors(vectors, n)

        self.frames += 1
        self._predict(steps)
        # NaN compares False, so a NaN score or coordinate fails these tests; an infinite coordinate makes the row's
        # sum infinite (as does a sum that overflows, far outside any frame).
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & np.isfinite(boxes.sum(axis=1))
        high = ok & (score >= opt.high_score)
        low = ok & (score < opt.high_score) & (score >= opt.low_score)
        if unit is not None and opt.center_vectors and (self._seen < _MEAN_HORIZON or self.frames % _SLOW_EVERY == 0):
            teach = high & unit_has
            self._update_mean(unit if teach.all() else unit[teach])
        t = len(self._ids)
        track_of = np.full(n, -1, np.intp)
        matched = np.zeros(t, bool)
        if t:
            appearance = None
            if unit is not None and opt.appearance_weight > 0.0:
                appearance = self._appearance(unit, unit_has)
            pred = self._boxes()
            tentative = self._state == _TENTATIVE
            high_idx = _where(high)
            # 1. High boxes against the confirmed tracks, tracking and lost: motion and appearance.
            self._associate(high_idx, _where(~tentative), boxes, pred, appearance, opt.match_iou, track_of, matched,
                            learn=True)
            # (Each later stage first checks cheaply that it has boxes and tracks to work on: most frames do not.)
            # 2. Low boxes against the tracks tracked on the previous frame and still unmatched: IoU alone.
            if low.any() and not matched.all():
                self._associate(_where(low), _where(~matched & (self._state == _TRACKED)), boxes, pred, None,
                                opt.low_match_iou, track_of, matched)
            # 3. High boxes left against the tentative tracks.
            if tentative.any():
                self._associate(high_idx[track_of[high_idx] < 0], _where(tentative), boxes, pred, appearance,
                                opt.match_iou, track_of, matched)
            # 4. Boxes left against lost tracks nearby, on appearance alone.
            if appearance is not None and appearance.calibrated and opt.reid_radius > 0.0 and not matched.all():
                lost = _where(~matched & (self._state == _LOST))
                if len(lost):
                    self._reidentify(_where((high | low) & (track_of < 0)), lost, boxes, appearance, track_of,
                                     matched)
        new_flags = np.zeros(n, bool)
        if t:
            self._correct(matched, track_of, boxes, score, unit, unit_has, new_flags)
            track_of = self._age(matched, steps, track_of)
        fresh = high & (track_of < 0)
        if fresh.any():
            self._start(_where(fresh & (score >= opt.new_track_score)), boxes, score, unit, unit_has, track_of,
                        new_flags)

        ids = np.zeros(n, np.uint64)
        has_track = track_of >= 0
        ids[has_track] = self._ids[track_of[has_track]]
        shown = ids != NO_TRACK
        new_flags &= shown
        out_vectors = None
        if return_vectors and self._dim is not None:
            out_vectors = np.zeros((n, self._dim), np.float32)
            out_vectors[shown] = self._vec[track_of[shown]]
        return TrackUpdate(ids=ids, new=new_flags, vectors=out_vectors, epoch=self.epoch)

    # Vectors.

    def _unit_vectors(self, vectors: np.ndarray | None, n: int) -> tuple[np.ndarray | None, np.ndarray]:
        """L2-normalised float32 rows (zeros for unusable rows) and which rows are usable; fixes D on first use."""
        if vectors is None:
            return None, np.zeros(n, bool)
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2 or len(v) != n:
            raise ValueError(f"vectors must have shape ({n}, D), got {v.shape}")
        if self._dim is None:
            if v.shape[1] == 0:
                raise ValueError("vectors must have at least one column")
            self._dim = v.shape[1]
            self._vec = np.zeros((len(self._ids), self._dim), np.float32)
        elif v.shape[1] != self._dim:
            raise ValueError(f"vectors must keep their width within an epoch: {self._dim} before, {v.shape[1]} now "
                             "(call reset() when the stream's vectors change)")
        with np.errstate(over="ignore", invalid="ignore"):
            norm2 = _rowdot(v, v)
        good = (norm2 > _EPS) & (norm2 < np.inf)
        unit = v * (np.where(good, norm2, np.float32(1.0)) ** -0.5)[:, None]
        if not good.all():
            unit[~good] = 0.0
        return unit, good

    def _update_mean(self, unit: np.ndarray) -> None:
        """Fold this frame's high-score unit vectors into the stream's running mean."""
        if not len(unit):
            return
        if self._mean is None:
            self._mean = np.zeros(self._dim, np.float32)
        self._seen += len(unit)
        rate = min(1.0, max(len(unit) / self._seen, len(unit) / _MEAN_HORIZON))
        self._mean += np.float32(rate) * (unit.mean(axis=0) - self._mean)

    def _appearance(self, unit: np.ndarray, unit_has: np.ndarray) -> _Appearance:
        """What the pairwise centred cosines need this frame, without centring any vector.

        For unit a, b and mean m: cos(a − m, b − m) = (a·b − a·m − b·m + m·m) / (|a − m| |b − m|) with
        |a − m|² = 1 − 2 a·m + m·m, so only a·m per box, b·m per track and a·b per pair are computed.
        """
        if self._mean is not None and self.options.center_vectors:
            m = self._mean
            mm = float(np.dot(m, m))
            det_m = _rowdot(unit, m)
            track_m = _rowdot(self._vec, m)
        else:
            mm, det_m, track_m = 0.0, np.zeros(len(unit), np.float32), np.zeros(len(self._vec), np.float32)
        det_n2 = 1.0 - 2.0 * det_m + mm
        track_n2 = 1.0 - 2.0 * track_m + mm
        same, diff = self._same, self._diff
        calibrated = same[0] >= _CALIBRATION_SAMPLES and diff[0] >= _CALIBRATION_SAMPLES and diff[1] > same[1]
        return _Appearance(unit, unit_has & (det_n2 > _MIN_CENTRED_NORM2), det_m, det_n2,
                           self._has_vec & (track_n2 > _MIN_CENTRED_NORM2), track_m, track_n2, mm, calibrated)

    def _distance(self, appearance: _Appearance, d_rows: np.ndarray, t_rows: np.ndarray) -> np.ndarray:
        """Cosine distances (after centring) of box rows and track rows, pair by pair."""
        dot = _rowdot(appearance.unit[d_rows], self._vec[t_rows])
        cos = (dot - appearance.det_m[d_rows] - appearance.track_m[t_rows] + appearance.mm) \
            / np.sqrt(appearance.det_n2[d_rows] * appearance.track_n2[t_rows])
        return 1.0 - cos

    def _llr(self, distance: np.ndarray) -> np.ndarray:
        """Log-likelihood ratio "same object" against "different objects" of cosine distances: the learnt
        distributions as two Gaussians with a pooled variance, which makes it linear in the distance."""
        _, same_mean, same_var = self._same
        _, diff_mean, diff_var = self._diff
        var = max((same_var + diff_var) / 2.0, _EPS)
        return (diff_mean - same_mean) / var * ((same_mean + diff_mean) / 2.0 - distance)

    @staticmethod
    def _learn(stats: list, values: np.ndarray) -> None:
        """Fold a few distances (at most ``_CALIBRATION_PER_FRAME``) into running [count, mean, variance]."""
        batch = values.tolist()
        size = len(batch)
        count, mean, var = stats
        count += size
        rate = min(1.0, max(size / count, size / _CALIBRATION_HORIZON))
        batch_mean = sum(batch) / size
        batch_var = sum((x - batch_mean) ** 2 for x in batch) / size
        delta = batch_mean - mean
        mean += rate * delta
        var = (1.0 - rate) * (var + rate * delta * delta) + rate * batch_var
        stats[:] = [count, mean, var]

    # Association.

    def _associate(self, dets: np.ndarray, tracks: np.ndarray, boxes: np.ndarray, pred: np.ndarray,
                   appearance: _Appearance | None, min_iou: float, track_of: np.ndarray, matched: np.ndarray, *,
                   learn: bool = False) -> None:
        """Match ``dets`` (box rows) to ``tracks`` (track rows) optimally among the pairs overlapping by at least
        ``min_iou``; writes ``track_of`` and ``matched``. With ``learn``, confident matches teach the appearance
        statistics."""
        if not len(dets) or not len(tracks):
            return
        opt = self.options
        iou = _iou(boxes[dets], pred[tracks])
        cost = 1.0 - iou
        allowed = iou >= min_iou
        if appearance is not None and appearance.calibrated:
            # Only the allowed pairs, a few per box: no dense boxes × tracks × D product (and no BLAS call, so no
            # BLAS threads in a front-end).
            d_pair, t_pair = allowed.nonzero()
            d_rows, t_rows = dets[d_pair], tracks[t_pair]
            both = appearance.det_ok[d_rows] & appearance.track_ok[t_rows]
            if not both.all():
                d_pair, t_pair, d_rows, t_rows = d_pair[both], t_pair[both], d_rows[both], t_rows[both]
            if len(d_pair):
                distance = self._distance(appearance, d_rows, t_rows)
                sure = np.tanh(self._llr(distance) / 2.0)
                sure[(sure > 0.0) & (distance > opt.appearance_threshold)] = 0.0
                cost[d_pair, t_pair] -= opt.appearance_weight * sure
        # Minimising the sum of (cost - limit) over the kept pairs, where a disallowed pair or one at or over the
        # limit is worth nothing, is the assignment with a rejection cost: scipy solves it as a plain rectangular
        # problem, and pairs worth nothing are dropped after.
        gain = np.where(allowed, np.minimum(cost - (1.0 - min_iou), 0.0), 0.0)
        rows, cols = _assign(gain)
        track_of[dets[rows]] = tracks[cols]
        matched[tracks[cols]] = True
        if learn and appearance is not None and len(rows) and len(tracks) >= 2 and (
                self.frames % _SLOW_EVERY == 0 or min(self._same[0], self._diff[0]) < _CALIBRATION_WARM):
            self._learn_from(appearance, iou, dets, tracks, rows, cols)

    def _learn_from(self, appearance: _Appearance, iou: np.ndarray, dets: np.ndarray, tracks: np.ndarray,
                    rows: np.ndarray, cols: np.ndarray) -> None:
        """Teach the same/different statistics from this frame's confident matches: a box overlapping its track
        by IoU ≥ 0.5 and no other track or box by 0.1 is a sample of "same"; that box against the next track in
        the list is a sample of "different"."""
        near_d, near_t = (iou >= 0.1).nonzero()
        alone = (iou[rows, cols] >= 0.5) & (np.bincount(near_d, minlength=len(dets))[rows] == 1) \
            & (np.bincount(near_t, minlength=len(tracks))[cols] == 1)
        other = tracks[(cols + 1) % len(tracks)]
        alone &= appearance.det_ok[dets[rows]] & appearance.track_ok[tracks[cols]] & appearance.track_ok[other]
        pick = _where(alone)[:_CALIBRATION_PER_FRAME]
        if len(pick):
            d_rows = dets[rows[pick]]
            self._learn(self._same, self._distance(appearance, d_rows, tracks[cols[pick]]))
            self._learn(self._diff, self._distance(appearance, d_rows, other[pick]))

    def _reidentify(self, dets: np.ndarray, tracks: np.ndarray, boxes: np.ndarray, appearance: _Appearance,
                    track_of: np.ndarray, matched: np.ndarray) -> None:
        """Match boxes left over to lost tracks on appearance, near where each track was last seen or is predicted
        (``reid_radius`` track heights), with a similar height and a likelihood ratio of at least
        ``reid_confidence``; among those, the surest (then nearest) pairs win."""
        if not len(dets) or not len(tracks):
            return
        opt = self.options
        z = _xywh(boxes[dets])
        last, now = self._last[tracks], self._x[tracks]
        height = last[:, 3]
        reach = np.minimum(np.hypot(z[:, None, 0] - last[None, :, 0], z[:, None, 1] - last[None, :, 1]),
                           np.hypot(z[:, None, 0] - now[None, :, 0], z[:, None, 1] - now[None, :, 1])) / height
        ratio = z[:, None, 3] / height
        near = (reach <= opt.reid_radius) & (ratio < _REID_HEIGHT_RATIO) & (ratio > 1.0 / _REID_HEIGHT_RATIO)
        d_pair, t_pair = np.nonzero(near & appearance.det_ok[dets, None] & appearance.track_ok[None, tracks])
        if not len(d_pair):
            return
        distance = self._distance(appearance, dets[d_pair], tracks[t_pair])
        llr = self._llr(distance)
        llr[distance > opt.appearance_threshold] = -np.inf
        gain = np.zeros(near.shape)
        # Worth the margin over the required confidence, less a little for the distance (ties go to the nearer).
        worth = opt.reid_confidence - llr + 0.1 * reach[d_pair, t_pair] / opt.reid_radius
        gain[d_pair, t_pair] = np.minimum(worth, 0.0)
        rows, cols = _assign(gain)
        track_of[dets[rows]] = tracks[cols]
        matched[tracks[cols]] = True

    # Kalman filter: per track and coordinate (cx, cy, w, h) an independent (position, velocity) pair.

    def _predict(self, steps: int) -> None:
        """Move every track ``steps`` frames ahead, in closed form: with F = [[1, k], [0, 1]] after k steps and the
        noise Q = diag(q_pos, q_vel) added each step, the covariance gains k·q_pos + q_vel·Σi², q_vel·Σi and k·q_vel
        (i = 0 … k − 1). The noise is scaled by the size at the start (exact for one step)."""
        if not len(self._ids):
            return
        lost = self._state == _LOST
        if lost.any():
            # A lost track keeps moving but stops changing size (nothing tells it how), as ByteTrack does.
            self._v[lost, 2:] = 0.0
        scale2 = np.square(self._x[:, _SIZE_OF])
        q_pos, q_vel = _STD_POSITION ** 2 * scale2, _STD_VELOCITY ** 2 * scale2
        if steps == 1:
            self._x += self._v
            self._pxx += 2.0 * self._pxv + self._pvv + q_pos
            self._pxv += self._pvv
            self._pvv += q_vel
        else:
            k = float(steps)
            sum_i, sum_i2 = k * (k - 1.0) / 2.0, (k - 1.0) * k * (2.0 * k - 1.0) / 6.0
            self._x += k * self._v
            self._pxx += 2.0 * k * self._pxv + k * k * self._pvv + k * q_pos + sum_i2 * q_vel
            self._pxv += k * self._pvv + sum_i * q_vel
            self._pvv += k * q_vel
        np.maximum(self._x[:, 2:], 1.0, out=self._x[:, 2:])

    def _boxes(self) -> np.ndarray:
        """The tracks' predicted boxes, x1, y1, x2, y2."""
        half = self._x[:, 2:] / 2.0
        return np.concatenate([self._x[:, :2] - half, self._x[:, :2] + half], axis=1)

    def _correct(self, matched: np.ndarray, track_of: np.ndarray, boxes: np.ndarray, score: np.ndarray,
                 unit: np.ndarray | None, unit_has: np.ndarray, new_flags: np.ndarray) -> None:
        """Kalman update, state, hits and vectors of every matched track. The filter runs on all rows with a zero
        gain on the unmatched ones: cheaper than gathering and scattering the matched rows."""
        dets = _where(track_of >= 0)
        if not len(dets):
            return
        rows = track_of[dets]
        measured = _xywh(boxes[dets])
        self._last[rows] = measured
        innovation = np.zeros((len(self._x), 4))
        innovation[rows] = measured - self._x[rows]
        r = _STD_POSITION ** 2 * np.square(self._x[:, _SIZE_OF])
        gain_scale = matched[:, None] / (self._pxx + r)
        kx, kv = self._pxx * gain_scale, self._pxv * gain_scale
        self._x += kx * innovation
        self._v += kv * innovation
        self._pvv -= kv * self._pxv
        np.subtract(1.0, kx, out=kx)
        self._pxv *= kx
        self._pxx *= kx
        self._hits += matched
        self._missed[rows] = 0
        tentative = self._state[rows] == _TENTATIVE
        if tentative.any():
            confirm = tentative & (self._hits[rows] >= self.options.min_hits)
            self._state[rows[~tentative | confirm]] = _TRACKED
            if confirm.any():
                self._assign_ids(rows[confirm])
                new_flags[dets[confirm]] = True
        else:
            self._state[rows] = _TRACKED
        if unit is not None:
            # Only confident boxes teach a track its look: low-score boxes are mostly partly hidden ones.
            teach = (score[dets] >= self.options.high_score) & unit_has[dets]
            if teach.any():
                t_rows, d_rows = (rows, dets) if teach.all() else (rows[teach], dets[teach])
                # A track without a vector has a zero row, so the blend is then the box's own direction.
                blended = self._vec[t_rows]
                blended *= np.float32(self.options.vector_smoothing)
                blended += np.float32(1.0 - self.options.vector_smoothing) * unit[d_rows]
                blended *= (np.maximum(_rowdot(blended, blended), _EPS) ** -0.5)[:, None]
                self._vec[t_rows] = blended
                self._has_vec[t_rows] = True

    def _assign_ids(self, rows: np.ndarray) -> None:
        count = len(rows)
        self._ids[rows] = np.arange(self._next_id, self._next_id + count, dtype=np.uint64)
        self._next_id += count

    def _age(self, matched: np.ndarray, steps: int, track_of: np.ndarray) -> np.ndarray:
        """Unmatched tracks age: tracking ones become lost, tentative ones are dropped, and lost ones unmatched for
        more than ``max_lost`` frames are dropped. Returns ``track_of`` renumbered to the kept rows."""
        if matched.all():
            return track_of
        unmatched = ~matched
        self._missed[unmatched] += steps
        self._state[unmatched & (self._state == _TRACKED)] = _LOST
        keep = matched | ((self._state != _TENTATIVE) & (self._missed <= self.options.max_lost))
        if keep.all():
            return track_of
        for name in _TRACK_ARRAYS:
            setattr(self, name, getattr(self, name)[keep])
        # Matched tracks are always kept, so every box's track has a row in the kept arrays.
        renumber = np.cumsum(keep) - 1
        return np.where(track_of >= 0, renumber[track_of], -1)

    def _start(self, dets: np.ndarray, boxes: np.ndarray, score: np.ndarray, unit: np.ndarray | None,
               unit_has: np.ndarray, track_of: np.ndarray, new_flags: np.ndarray) -> None:
        """Start tracks for ``dets``, highest score first, while there is room under ``max_tracks``: confirmed at
        once (with ids) on an epoch's first frame or when ``min_hits`` is 1, else tentative."""
        room = self.options.max_tracks - len(self._ids)
        if not len(dets) or room <= 0:
            return
        if len(dets) > room:
            dets = np.sort(dets[np.argsort(-score[dets], kind="stable")[:room]])
        count = len(dets)
        first = len(self._ids)
        z = _xywh(boxes[dets])
        scale = z[:, _SIZE_OF]
        confirm = self.frames == 1 or self.options.min_hits <= 1
        self._ids = np.concatenate([self._ids, np.zeros(count, np.uint64)])
        self._state = np.concatenate([self._state, np.full(count, _TRACKED if confirm else _TENTATIVE, np.int8)])
        self._hits = np.concatenate([self._hits, np.ones(count, np.int32)])
        self._missed = np.concatenate([self._missed, np.zeros(count, np.int32)])
        self._x = np.concatenate([self._x, z])
        self._v = np.concatenate([self._v, np.zeros((count, 4))])
        self._pxx = np.concatenate([self._pxx, (2.0 * _STD_POSITION * scale) ** 2])
        self._pxv = np.concatenate([self._pxv, np.zeros((count, 4))])
        self._pvv = np.concatenate([self._pvv, (10.0 * _STD_VELOCITY * scale) ** 2])
        self._last = np.concatenate([self._last, z])
        # Before any vector the vector array is (tracks, 0) wide; the first vectors widen it.
        if unit is not None:
            self._vec = np.concatenate([self._vec, unit[dets]])
            self._has_vec = np.concatenate([self._has_vec, unit_has[dets]])
        else:
            self._vec = np.concatenate([self._vec, np.zeros((count, self._vec.shape[1]), np.float32)])
            self._has_vec = np.concatenate([self._has_vec, np.zeros(count, bool)])
        rows = np.arange(first, first + count)
        track_of[dets] = rows
        if confirm:
            self._assign_ids(rows)
            new_flags[dets] = True


def _assign(gain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (row, column) pairs of the assignment with the most negative total gain, pairs worth nothing dropped.

    When no row and no column has two candidates (the usual frame: every box near one track), taking every
    candidate is that assignment, and the Hungarian solver is skipped.
    """
    rows, cols = (gain < 0.0).nonzero()
    if not len(rows) or (np.bincount(rows).max() <= 1 and np.bincount(cols).max() <= 1):
        return rows, cols
    rows, cols = linear_sum_assignment(gain)
    keep = gain[rows, cols] < 0.0
    return rows[keep], cols[keep]


def _rowdot_einsum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products (numpy before 2.0, which has no ``vecdot``)."""
    return np.einsum("ij,ij->i" if b.ndim == 2 else "ij,j->i", a, b)


#: Row-wise dot products of (N, D) with (N, D) or (D,): ``np.vecdot`` where it exists (twice as fast as einsum).
_rowdot = getattr(np, "vecdot", _rowdot_einsum)


def _where(mask: np.ndarray) -> np.ndarray:
    """The indices where a 1-D mask is True (``np.flatnonzero`` without its wrapper's overhead)."""
    return mask.nonzero()[0]


def _xywh(boxes: np.ndarray) -> np.ndarray:
    """x1, y1, x2, y2 → cx, cy, w, h."""
    wh = boxes[:, 2:] - boxes[:, :2]
    return np.concatenate([boxes[:, :2] + wh / 2.0, wh], axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of x1, y1, x2, y2 boxes (outer operations, in place: few temporaries)."""
    iw = np.minimum.outer(a[:, 2], b[:, 2])
    iw -= np.maximum.outer(a[:, 0], b[:, 0])
    ih = np.minimum.outer(a[:, 3], b[:, 3])
    ih -= np.maximum.outer(a[:, 1], b[:, 1])
    np.maximum(iw, 0.0, out=iw)
    np.maximum(ih, 0.0, out=ih)
    iw *= ih
    union = np.add.outer((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    union -= iw
    np.maximum(union, _EPS, out=union)
    iw /= union
    return iw
