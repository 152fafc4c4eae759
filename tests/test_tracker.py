"""The front-end tracker (issue 22): ByteTrack's cascade, appearance through crossings, bounded state, options.

Every scene here is drawn by hand (or from a seeded generator) so each outcome is known and exact; nothing is
timed. bench/tracking_bench.py measures the tracker against supervision's ByteTrack on larger scenes.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from yolostream.server.frontend import tracker as trk  # noqa: E402
Tracker, TrackerOptions, NO_TRACK = trk.Tracker, trk.TrackerOptions, trk.NO_TRACK

HIGH = 0.9
LOW = 0.3


def box(x: float, y: float, w: float = 60.0, h: float = 120.0) -> list[float]:
    return [x, y, x + w, y + h]


def frame(*rows: list[float]) -> np.ndarray:
    return np.array(rows, np.float32).reshape(-1, 4)


def bounce(frames: int = 40, meet: int = 20) -> list[np.ndarray]:
    """Two people walk towards each other (A from the left at 8 px/frame, B from the right at 10), meet, and both
    turn back: after the turn each stands where the motion model expects the other."""
    out = []
    for t in range(frames):
        if t <= meet:
            xa, xb = 100 + 8 * t, 460 - 10 * t
        else:
            xa, xb = 100 + 8 * meet - 8 * (t - meet), 460 - 10 * meet + 10 * (t - meet)
        out.append(frame(box(xa, 200), box(xb, 205)))
    return out


def passing(frames: int = 40) -> list[np.ndarray]:
    """The same two people walk through each other without turning."""
    return [frame(box(100 + 8 * t, 200), box(460 - 10 * t, 205)) for t in range(frames)]


def run(tracker, frames: list[np.ndarray], vectors=None, scores=None) -> list[tuple[int, ...]]:
    """The ids per frame, as tuples in box order."""
    out = []
    for k, boxes in enumerate(frames):
        s = np.full(len(boxes), HIGH) if scores is None else scores[k]
        u = tracker.update(boxes, s, None if vectors is None else vectors(k, len(boxes)))
        out.append(tuple(int(i) for i in u.ids))
    return out


def distinct_looks(seed: int = 0, dim: int = 64, noise: float = 0.05):
    """Per-frame vectors for two objects that look different (row 0 is A, row 1 is B), with a little noise."""
    rng = np.random.default_rng(seed)
    looks = rng.normal(size=(2, dim)).astype(np.float32)
    return lambda k, n: (looks[:n] + rng.normal(0.0, noise, (n, dim))).astype(np.float32)


# Crossings.

def test_iou_only_tracking_swaps_the_ids_of_two_people_who_turn_back_where_they_meet():
    """The known failure of motion-only tracking: after the turn each track's prediction lies on the other."""
    ids = run(Tracker(TrackerOptions(appearance_weight=0.0)), bounce(), vectors=distinct_looks())
    assert ids[:21] == [(1, 2)] * 21
    assert ids[21:] == [(2, 1)] * 19


def test_distinct_appearance_keeps_both_ids_through_the_turn():
    tracker = Tracker()
    ids = run(tracker, bounce(), vectors=distinct_looks())
    assert ids == [(1, 2)] * 40
    assert tracker.next_id == 3


def test_walking_through_each_other_keeps_the_ids_with_and_without_appearance():
    """A straight crossing is motion's easy case: the velocity carries each track through the overlap."""
    assert run(Tracker(TrackerOptions(appearance_weight=0.0)), passing()) == [(1, 2)] * 40
    assert run(Tracker(), passing(), vectors=distinct_looks()) == [(1, 2)] * 40


@pytest.mark.parametrize("centre", [True, False])
def test_vectors_that_look_alike_for_everyone_change_nothing(centre):
    """Collapsed vectors (one vector plus 0.1 % noise for every box) give exactly the IoU-only outcome."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=64).astype(np.float32)

    def collapsed(k, n):
        return (base + rng.normal(0.0, 1e-3, (n, 64))).astype(np.float32)

    expected = run(Tracker(TrackerOptions(appearance_weight=0.0)), bounce())
    assert run(Tracker(TrackerOptions(center_vectors=centre)), bounce(), vectors=collapsed) == expected


def test_random_vectors_change_nothing_on_a_busy_scene():
    """Independent random vectors per box carry no identity: the tracker's ids equal IoU-only tracking's on a
    seeded scene of twelve walkers with noisy boxes."""
    rng = np.random.default_rng(11)
    start = rng.uniform(0, 600, (12, 2))
    velocity = rng.normal(0, 4, (12, 2))
    frames = [frame(*[box(*(start[k] + velocity[k] * t + rng.normal(0, 2, 2)), 40, 90) for k in range(12)])
              for t in range(60)]
    noise = np.random.default_rng(12)
    expected = run(Tracker(TrackerOptions(appearance_weight=0.0)), frames)
    got = run(Tracker(), frames, vectors=lambda k, n: noise.normal(size=(n, 128)).astype(np.float32))
    assert got == expected


def test_appearance_brings_a_lost_track_back_after_the_motion_model_lost_it():
    """A walks right, hides for 8 frames while it stops and turns back, and reappears 80 px behind where the
    filter predicts it: IoU alone starts a new track, re-identification by appearance finds track 1 again."""
    def scene():
        out = []
        for t in range(40):
            x = 100 + 8 * min(t, 15) - 4 * max(t - 23, 0)
            b_x = 500
            rows = [box(b_x, 40)] if 15 < t <= 23 else [box(x, 200), box(b_x, 40)]
            out.append(frame(*rows))
        return out

    rng = np.random.default_rng(5)
    looks = rng.normal(size=(2, 64)).astype(np.float32)

    def vectors(k, n):
        rows = looks[[1]] if n == 1 else looks
        return (rows + rng.normal(0.0, 0.05, rows.shape)).astype(np.float32)

    iou_only = run(Tracker(TrackerOptions(appearance_weight=0.0)), scene())
    with_looks = run(Tracker(), scene(), vectors=vectors)
    assert iou_only[15] == (1, 2) and with_looks[15] == (1, 2)
    assert iou_only[-1][0] not in (NO_TRACK, 1)
    assert with_looks[24:] == [(1, 2)] * 16


# ByteTrack's cascade, IoU only.

def test_low_score_boxes_extend_tracks_but_never_start_one():
    tracker = Tracker(TrackerOptions(appearance_weight=0.0))
    first = tracker.update(frame(box(100, 100)), np.array([HIGH]))
    assert first.ids.tolist() == [1] and first.new.tolist() == [True]
    for k in range(1, 6):
        u = tracker.update(frame(box(100 + 3 * k, 100), box(400, 300)), np.array([LOW, LOW]))
        assert u.ids.tolist() == [1, NO_TRACK] and not u.new.any()
    assert len(tracker) == 1
    u = tracker.update(frame(box(118, 100), box(400, 300)), np.array([HIGH, 0.05]))
    assert u.ids.tolist() == [1, NO_TRACK] and len(tracker) == 1


def test_a_low_box_cannot_pick_up_a_track_that_is_already_lost():
    """ByteTrack's second association only serves tracks tracked on the previous frame."""
    tracker = Tracker(TrackerOptions(appearance_weight=0.0))
    tracker.update(frame(box(100, 100)), np.array([HIGH]))
    tracker.update(frame(), np.zeros(0))
    assert tracker.update(frame(box(100, 100)), np.array([LOW])).ids.tolist() == [NO_TRACK]
    assert tracker.update(frame(box(100, 100)), np.array([HIGH])).ids.tolist() == [1]


def test_lost_tracks_survive_max_lost_frames_then_die_and_ids_are_never_reused():
    tracker = Tracker(TrackerOptions(appearance_weight=0.0, max_lost=3))
    assert tracker.update(frame(box(100, 100), box(400, 100)), None).ids.tolist() == [1, 2]
    # Both vanish; A comes back after 3 missing frames, B after 4.
    for _ in range(3):
        assert tracker.update(frame(), None).ids.tolist() == []
    assert len(tracker) == 2
    assert tracker.update(frame(box(100, 100)), None).ids.tolist() == [1]
    assert len(tracker) == 1  # B missed a 4th frame: deleted
    u = tracker.update(frame(box(100, 100), box(400, 100)), None)
    assert u.ids.tolist() == [1, NO_TRACK]  # a new track: tentative, no id yet
    u = tracker.update(frame(box(100, 100), box(400, 100)), None)
    assert u.ids.tolist() == [1, 3] and u.new.tolist() == [False, True]


def test_a_new_track_gets_its_id_on_its_second_frame_and_a_single_false_box_gets_none():
    tracker = Tracker(TrackerOptions(appearance_weight=0.0))
    tracker.update(frame(box(100, 100)), None)
    u = tracker.update(frame(box(100, 100), box(300, 300)), None)
    assert u.ids.tolist() == [1, NO_TRACK] and len(tracker) == 2
    u = tracker.update(frame(box(100, 100), box(302, 301)), None)
    assert u.ids.tolist() == [1, 2] and u.new.tolist() == [False, True]
    u = tracker.update(frame(box(100, 100), box(304, 302), box(50, 400)), None)
    assert u.ids.tolist() == [1, 2, NO_TRACK]
    assert tracker.update(frame(box(100, 100), box(306, 303)), None).ids.tolist() == [1, 2]
    assert len(tracker) == 2  # the single-frame box's tentative track is gone
    assert tracker.next_id == 3


def test_min_hits_one_confirms_at_once_and_new_track_score_gates_births():
    tracker = Tracker(TrackerOptions(min_hits=1, high_score=0.5, new_track_score=0.7))
    tracker.update(frame(), None)
    u = tracker.update(frame(box(100, 100), box(300, 100)), np.array([0.8, 0.6]))
    assert u.ids.tolist() == [1, NO_TRACK] and u.new.tolist() == [True, False]


def test_scores_none_counts_every_box_as_high():
    tracker = Tracker(TrackerOptions(high_score=1.0, new_track_score=1.0))
    assert tracker.update(frame(box(0, 0), box(200, 0)), None).ids.tolist() == [1, 2]
    assert tracker.update(frame(box(2, 0), box(202, 0)), None).ids.tolist() == [1, 2]
    # With scores, 0.99 is under high_score = 1.0: a low box, which only extends tracks.
    assert tracker.update(frame(box(4, 0), box(500, 300)), np.array([0.99, 0.99])).ids.tolist() == [1, NO_TRACK]


def test_frames_elapsed_ages_lost_tracks_by_the_dropped_frames():
    tracker = Tracker(TrackerOptions(max_lost=5))
    tracker.update(frame(box(100, 100)), None)
    tracker.update(frame(), None, frames_elapsed=5)
    assert len(tracker) == 1
    tracker.update(frame(), None, frames_elapsed=1)
    assert len(tracker) == 0
    with pytest.raises(ValueError, match="frames_elapsed"):
        tracker.update(frame(), None, frames_elapsed=0)


def test_frames_elapsed_moves_the_prediction_as_far_as_the_dropped_frames():
    """A track walking 10 px/frame, next seen 5 frames later, 50 px on: found with the skip, lost without it."""
    def walk(skip: int) -> list[int]:
        tracker = Tracker(TrackerOptions(appearance_weight=0.0))
        for t in range(10):
            tracker.update(frame(box(100 + 10 * t, 100, 30, 60)), None)
        return tracker.update(frame(box(190 + 10 * skip, 100, 30, 60)), None, frames_elapsed=skip).ids.tolist()

    assert walk(5) == [1]
    tracker = Tracker(TrackerOptions(appearance_weight=0.0))
    for t in range(10):
        tracker.update(frame(box(100 + 10 * t, 100, 30, 60)), None)
    assert tracker.update(frame(box(240, 100, 30, 60)), None).ids.tolist() == [NO_TRACK]


def test_reset_starts_a_new_epoch_and_keeps_counting_ids():
    tracker = Tracker()
    assert tracker.epoch == 1
    assert tracker.update(frame(box(0, 0), box(200, 0)), None).ids.tolist() == [1, 2]
    tracker.reset()
    assert tracker.epoch == 2 and len(tracker) == 0
    u = tracker.update(frame(box(0, 0)), None)
    assert u.ids.tolist() == [3] and u.new.tolist() == [True] and u.epoch == 2


# Bounds and inputs.

def test_the_track_limit_holds_under_a_flood_of_boxes_and_the_best_boxes_get_the_room():
    rng = np.random.default_rng(7)
    tracker = Tracker(TrackerOptions(max_tracks=20, min_hits=1))
    for _ in range(30):
        corner = rng.uniform(0, 2000, (300, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(5, 40, (300, 2))], axis=1)
        scores = rng.uniform(0.6, 1.0, 300)
        u = tracker.update(boxes, scores, rng.normal(size=(300, 32)).astype(np.float32))
        assert len(tracker) <= 20
        assert np.count_nonzero(u.ids) <= 20
    first = Tracker(TrackerOptions(max_tracks=3))
    u = first.update(frame(box(0, 0), box(100, 0), box(200, 0), box(300, 0), box(400, 0)),
                     np.array([0.7, 0.9, 0.65, 0.95, 0.8]))
    # Room for three: the three best scores get tracks (ids in box order), the two lowest get none.
    assert u.ids.tolist() == [NO_TRACK, 1, NO_TRACK, 2, 3] and len(first) == 3


def test_track_vectors_come_back_unit_length_and_zero_where_there_is_no_track():
    tracker = Tracker()
    rng = np.random.default_rng(1)
    v = rng.normal(size=(2, 16)).astype(np.float32) * 5
    u = tracker.update(frame(box(0, 0), box(300, 0)), np.array([HIGH, 0.05]), v, return_vectors=True)
    assert u.vectors.shape == (2, 16) and u.vectors.dtype == np.float32
    assert u.ids.tolist() == [1, NO_TRACK]
    np.testing.assert_allclose(u.vectors[0], v[0] / np.linalg.norm(v[0]), rtol=1e-5)
    assert not u.vectors[1].any()
    assert tracker.update(frame(box(0, 0)), None, return_vectors=True).vectors.shape == (1, 16)
    assert Tracker().update(frame(box(0, 0)), None, return_vectors=True).vectors is None


def test_bad_rows_get_no_track_and_bad_shapes_raise():
    tracker = Tracker(TrackerOptions(min_hits=1))
    boxes = frame(box(0, 0), [np.nan, 0, 10, 10], [10, 10, 5, 20], [0, 0, np.inf, 10], box(300, 0))
    vectors = np.ones((5, 8), np.float32)
    vectors[4] = np.nan
    u = tracker.update(boxes, np.array([HIGH, HIGH, HIGH, HIGH, np.nan]), vectors)
    assert u.ids.tolist() == [1, NO_TRACK, NO_TRACK, NO_TRACK, NO_TRACK]
    with pytest.raises(ValueError, match="boxes"):
        tracker.update(np.zeros((2, 3)), None)
    with pytest.raises(ValueError, match="scores"):
        tracker.update(frame(box(0, 0)), np.zeros(2))
    with pytest.raises(ValueError, match="width"):
        tracker.update(frame(box(0, 0)), None, np.ones((1, 9), np.float32))
    tracker.reset()
    assert tracker.update(frame(box(0, 0)), None, np.ones((1, 9), np.float32)).ids.tolist() == [2]


def test_empty_frames_are_fine():
    tracker = Tracker()
    u = tracker.update(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros((0, 8), np.float32), return_vectors=True)
    assert u.ids.shape == (0,) and u.ids.dtype == np.uint64 and u.new.shape == (0,) and u.vectors.shape == (0, 8)


@pytest.mark.parametrize("field, value, message", [
    ("high_score", math.nan, "high_score"),
    ("high_score", 1.5, "high_score"),
    ("low_score", -0.1, "low_score"),
    ("low_score", 0.6, "low_score must be at most high_score"),
    ("new_track_score", 0.4, "new_track_score must be at least high_score"),
    ("match_iou", math.inf, "match_iou"),
    ("low_match_iou", "0.5", "low_match_iou"),
    ("appearance_weight", 1.01, "appearance_weight"),
    ("appearance_threshold", 2.5, "appearance_threshold"),
    ("reid_radius", -1.0, "reid_radius"),
    ("reid_confidence", math.nan, "reid_confidence"),
    ("vector_smoothing", 1.0, "vector_smoothing"),
    ("center_vectors", 1, "center_vectors"),
    ("max_lost", 2.5, "max_lost"),
    ("max_lost", -1, "max_lost"),
    ("min_hits", 0, "min_hits"),
    ("min_hits", True, "min_hits"),
    ("max_tracks", 0, "max_tracks"),
])
def test_options_name_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrackerOptions(**{field: value})


def test_the_defaults_are_valid_and_documented():
    options = TrackerOptions()
    doc = TrackerOptions.__doc__
    for name in options.__dataclass_fields__:
        assert f"{name}:" in doc, name


def test_the_tracker_imports_neither_torch_nor_grpc():
    code = ("import sys\n"
            "from yolostream.server.frontend import tracker as m\n"
            "m.Tracker().update([[0, 0, 1, 1]], None, [[1.0, 0.0]])\n"
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'grpc'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
