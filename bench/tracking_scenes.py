"""Synthetic tracking sequences with ground truth, for bench/tracking_bench.py (issue 22).

Every identity is a textured ellipse (its own colours and pattern) walking over a textured background; the
camera is static. A foreground pillar hides what passes behind it for a few frames. Two groups of sequences:

- ``crossing``: pairs of objects meet and part again. Each meeting is one of four kinds, in turn: ``pass``
  (both walk straight through each other), ``bounce`` (both turn back where they meet), ``turn`` (both leave in
  new directions) and ``linger`` (both stand together for a while, then leave in new directions). A passer-by
  walks across as well.
- ``plain``: objects walk in separate horizontal lanes, so no two ever overlap; when one leaves the frame a new
  identity enters its lane later.

A simulated detector sees an object when at least ``VISIBLE`` of it shows (pillar, other objects and the frame's
edges hide the rest): it misses ``MISS_RATE`` of them at random, scores a partly hidden object low (the boxes
ByteTrack's second association exists for) and a fully visible one mostly high, adds Gaussian noise to every box
edge, and reports false boxes at random places. The ground truth of a frame is every object at least ``VISIBLE``
visible, with its true box clipped to the frame.

Everything is drawn from one seeded generator: the same ``SceneConfig`` gives the same sequences, pixels included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

#: An object counts (in the ground truth, and for the detector) when at least this share of it is visible.
VISIBLE = 0.3
#: Share of visible objects the detector misses at random.
MISS_RATE = 0.08
#: Visibility under which a detected object scores low (0.15–0.5), and the chance a fully visible one does too.
LOW_SCORE_VISIBILITY = 0.7
LOW_SCORE_RATE = 0.1
#: Standard deviation of each box edge's noise, as a share of the box's width (x edges) or height (y edges).
BOX_NOISE = 0.04
#: Mean number of false boxes per frame; their scores are uniform in 0.1–0.75.
FALSE_BOXES = 0.3
MEETING_KINDS = ("pass", "bounce", "turn", "linger")


@dataclass(frozen=True)
class SceneConfig:
    """What the sequences look like; every field goes into the vector cache's key."""

    seed: int = 7
    width: int = 640
    height: int = 384
    frames: int = 80
    crossing_sequences: int = 8
    plain_sequences: int = 3
    #: Meetings per crossing sequence (two objects each) and passers-by.
    meetings: int = 3
    passers: int = 1
    lanes: int = 4


@dataclass
class FrameTruth:
    """One frame: ground truth (ids and boxes) and what the simulated detector reported."""

    gt_ids: np.ndarray
    gt_boxes: np.ndarray
    det_boxes: np.ndarray
    det_scores: np.ndarray
    #: The identity each detection came from, -1 for a false box (for diagnostics only; trackers never see it).
    det_source: np.ndarray


@dataclass
class Sequence:
    """One sequence: its frames' truth, and what is needed to draw its pixels again."""

    name: str
    group: str
    frames: list[FrameTruth]
    tracks: np.ndarray  # (objects, frames, 4) cx, cy, w, h
    textures: list[np.ndarray]
    background: np.ndarray
    pillar: tuple[int, int]
    pillar_texture: np.ndarray
    #: Sensor noise, one of these (int16) on each frame in turn.
    grain: list[np.ndarray]
    kinds: list[str] = field(default_factory=list)

    def image(self, t: int) -> np.ndarray:
        """Frame ``t`` as a BGR uint8 image."""
        return _draw(self, t)[0]


def make_sequences(config: SceneConfig) -> list[Sequence]:
    """Every sequence of ``config``: the crossing group first, then the plain group."""
    rng = np.random.default_rng(config.seed)
    out = []
    for k in range(config.crossing_sequences):
        out.append(_crossing_sequence(rng, config, k))
    for k in range(config.plain_sequences):
        out.append(_plain_sequence(rng, config, k))
    return out


# Motion.

def _integrate(rng: np.random.Generator, frames: int, anchor_t: int, anchor_xy: np.ndarray,
               velocity: np.ndarray) -> np.ndarray:
    """Positions (frames, 2) through ``anchor_xy`` at ``anchor_t``, following per-frame ``velocity`` (frames, 2)
    plus a small random walk on it, so no object moves perfectly straight."""
    wobble = np.cumsum(rng.normal(0.0, 0.12, (frames, 2)), axis=0)
    wobble -= wobble[anchor_t]
    v = velocity + np.clip(wobble, -1.0, 1.0)
    pos = np.zeros((frames, 2))
    pos[anchor_t] = anchor_xy
    for t in range(anchor_t + 1, frames):
        pos[t] = pos[t - 1] + v[t - 1]
    for t in range(anchor_t - 1, -1, -1):
        pos[t] = pos[t + 1] - v[t]
    return pos


def _direction(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def _size(rng: np.random.Generator, low: float, high: float, frames: int) -> np.ndarray:
    """(frames, 2) w, h: a person-like box whose size drifts a little (walking towards or away from the camera)."""
    h0 = rng.uniform(low, high)
    w0 = h0 * rng.uniform(0.42, 0.6)
    scale = 1.0 + np.linspace(0.0, rng.uniform(-0.12, 0.12), frames)
    return np.stack([w0 * scale, h0 * scale], axis=1)


def _meeting(rng: np.random.Generator, config: SceneConfig, kind: str) -> list[np.ndarray]:
    """Two tracks (frames, 4) that meet once, in the way ``kind`` says."""
    frames, width, height = config.frames, config.width, config.height
    t_meet = int(rng.integers(20, frames - 20))
    where = np.array([rng.uniform(0.25, 0.75) * width, rng.uniform(0.35, 0.7) * height])
    heading = rng.choice([0.0, math.pi]) + rng.normal(0.0, 0.35)
    headings = (heading, heading + math.pi + rng.normal(0.0, 0.5))
    size = _size(rng, 80.0, 110.0, frames)
    tracks = []
    for k in range(2):
        speed = rng.uniform(2.5, 5.0)
        before = _direction(headings[k]) * speed
        if kind == "pass":
            after = before
        elif kind == "bounce":
            after = -_direction(headings[k] + rng.normal(0.0, 0.3)) * speed
        else:
            after = _direction(rng.uniform(0.0, 2 * math.pi)) * rng.uniform(2.5, 5.0)
        velocity = np.zeros((frames, 2))
        if kind == "linger":
            stay = int(rng.integers(6, 12))
            velocity[: t_meet - stay] = before
            velocity[t_meet + stay:] = after
        else:
            velocity[:t_meet] = before
            velocity[t_meet:] = after
        offset = np.array([rng.normal(0.0, 6.0), (k - 0.5) * rng.uniform(6.0, 16.0)])
        pos = _integrate(rng, frames, t_meet, where + offset, velocity)
        wh = size * rng.uniform(0.92, 1.08)
        tracks.append(np.concatenate([pos, wh], axis=1))
    return tracks


def _passer(rng: np.random.Generator, config: SceneConfig) -> np.ndarray:
    """A track that walks across the frame, roughly horizontally."""
    frames, width, height = config.frames, config.width, config.height
    t0 = int(rng.integers(0, frames // 2))
    leftwards = rng.random() < 0.5
    start = np.array([width + 40.0 if leftwards else -40.0, rng.uniform(0.3, 0.75) * height])
    speed = rng.uniform(4.0, 7.0)
    velocity = np.tile(_direction((math.pi if leftwards else 0.0) + rng.normal(0.0, 0.15)) * speed, (frames, 1))
    pos = _integrate(rng, frames, t0, start, velocity)
    return np.concatenate([pos, _size(rng, 75.0, 105.0, frames)], axis=1)


def _lane_tracks(rng: np.random.Generator, config: SceneConfig, lane: int) -> list[np.ndarray]:
    """Objects in one horizontal lane, one at a time: the next enters some frames after the last one left."""
    frames, width, height = config.frames, config.width, config.height
    pitch = height / config.lanes
    y = (lane + 0.5) * pitch
    out = []
    t = int(rng.integers(-frames // 2, frames // 3))
    while t < frames:
        leftwards = rng.random() < 0.5
        speed = rng.uniform(3.0, 6.0)
        size = _size(rng, 0.62 * pitch, 0.8 * pitch, frames)
        start = np.array([width + size[0, 0] if leftwards else -size[0, 0], y])
        velocity = np.tile(np.array([-speed if leftwards else speed, 0.0]), (frames, 1))
        pos = np.zeros((frames, 2))
        for k in range(frames):
            pos[k] = start + velocity[0] * (k - t)
        pos[:, 1] += np.cumsum(rng.normal(0.0, 0.3, frames)).clip(-0.08 * pitch, 0.08 * pitch)
        out.append(np.concatenate([pos, size], axis=1))
        crossing_frames = (width + 2 * size[0, 0]) / speed
        t += int(crossing_frames) + int(rng.integers(3, 20))
    return out


def _crossing_sequence(rng: np.random.Generator, config: SceneConfig, index: int) -> Sequence:
    tracks, kinds = [], []
    for m in range(config.meetings):
        kind = MEETING_KINDS[(index * config.meetings + m) % len(MEETING_KINDS)]
        kinds.append(kind)
        tracks += _meeting(rng, config, kind)
    for _ in range(config.passers):
        tracks.append(_passer(rng, config))
    return _finish(rng, config, f"crossing-{index}", "crossing", np.stack(tracks), kinds)


def _plain_sequence(rng: np.random.Generator, config: SceneConfig, index: int) -> Sequence:
    tracks = []
    for lane in range(config.lanes):
        tracks += _lane_tracks(rng, config, lane)
    return _finish(rng, config, f"plain-{index}", "plain", np.stack(tracks), [])


# Looks.

def _texture(rng: np.random.Generator, height: int = 96, width: int = 48) -> np.ndarray:
    """An identity's look: two or three colours in one of several patterns, plus grain."""
    hues = rng.uniform(0, 180, 3)
    colours = np.array([cv2.cvtColor(np.uint8([[[h, rng.uniform(90, 255), rng.uniform(70, 255)]]]),
                                     cv2.COLOR_HSV2BGR)[0, 0] for h in hues], np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    period = rng.uniform(6.0, 18.0)
    pattern = int(rng.integers(0, 5))
    if pattern == 0:
        angle = rng.uniform(0, math.pi)
        which = (np.floor((xx * math.cos(angle) + yy * math.sin(angle)) / period) % 2).astype(int)
    elif pattern == 1:
        which = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(int)
    elif pattern == 2:
        split = rng.uniform(0.35, 0.65) * height
        which = (yy > split).astype(int) + ((yy > split) & (np.floor(xx / period) % 2 == 1)).astype(int)
    elif pattern == 3:
        blobs = cv2.resize(rng.random((6, 3)).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
        which = np.digitize(blobs, [0.4, 0.65])
    else:
        ring = np.hypot(xx - width / 2, yy - height / 2)
        which = (np.floor(ring / period) % 3).astype(int)
    image = colours[which] + rng.normal(0.0, 10.0, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted scene: a smooth colour field with large soft blotches and fine grain."""
    coarse = rng.uniform(60, 170, (4, 6, 3)).astype(np.float32)
    field_ = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    blotches = cv2.resize(rng.normal(0, 18, (24, 40, 3)).astype(np.float32), (width, height),
                          interpolation=cv2.INTER_LINEAR)
    return np.clip(field_ + blotches + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)


def _grain(rng: np.random.Generator, width: int, height: int, count: int = 4) -> list[np.ndarray]:
    """A few frames of Gaussian sensor noise (σ 3 grey levels), so consecutive frames differ pixel by pixel."""
    return [np.clip(rng.normal(0.0, 3.0, (height, width, 3)), -12, 12).astype(np.int16) for _ in range(count)]


_MASKS: dict[tuple[int, int], np.ndarray] = {}


def _ellipse(w: int, h: int) -> np.ndarray:
    key = (w, h)
    if key not in _MASKS:
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, (((w - 1) / 2.0, (h - 1) / 2.0), (float(w), float(h)), 0.0), 255, -1)
        _MASKS[key] = mask > 0
    return _MASKS[key]


def _draw(seq: Sequence, t: int, pixels: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Frame ``t``'s image (None without ``pixels``) and each object's visible share."""
    height, width = seq.background.shape[:2]
    image = seq.background.copy() if pixels else None
    labels = np.zeros((height, width), np.int32)
    boxes = seq.tracks[:, t]
    full = np.zeros(len(boxes))
    # Painter's order: the object whose feet are lower in the frame is nearer the camera.
    order = np.argsort(boxes[:, 1] + boxes[:, 3] / 2, kind="stable")
    for k in order:
        cx, cy, w, h = boxes[k]
        x1, y1 = int(round(cx - w / 2)), int(round(cy - h / 2))
        iw, ih = max(int(round(w)), 2), max(int(round(h)), 2)
        mask = _ellipse(iw, ih)
        full[k] = mask.sum()
        fx1, fy1, fx2, fy2 = max(x1, 0), max(y1, 0), min(x1 + iw, width), min(y1 + ih, height)
        if fx2 <= fx1 or fy2 <= fy1:
            continue
        sub = mask[fy1 - y1:fy2 - y1, fx1 - x1:fx2 - x1]
        labels[fy1:fy2, fx1:fx2][sub] = k + 1
        if pixels:
            patch = cv2.resize(seq.textures[k], (iw, ih), interpolation=cv2.INTER_LINEAR)
            image[fy1:fy2, fx1:fx2][sub] = patch[fy1 - y1:fy2 - y1, fx1 - x1:fx2 - x1][sub]
    px1, px2 = seq.pillar
    labels[:, px1:px2] = 0
    counts = np.bincount(labels.ravel(), minlength=len(boxes) + 1)[1:]
    visible = counts / np.maximum(full, 1.0)
    if pixels:
        image[:, px1:px2] = seq.pillar_texture
        image = cv2.add(image.astype(np.int16), seq.grain[t % len(seq.grain)], dtype=cv2.CV_8U)
    return image, visible


def _finish(rng: np.random.Generator, config: SceneConfig, name: str, group: str, tracks: np.ndarray,
            kinds: list[str]) -> Sequence:
    """Textures, background, pillar; then the truth and the detector's output for every frame."""
    width, height = config.width, config.height
    pillar_w = int(rng.integers(30, 42))
    pillar_x = int(rng.uniform(0.3, 0.7) * width)
    pillar_texture = _texture(rng, height, pillar_w)
    seq = Sequence(name=name, group=group, frames=[], tracks=tracks,
                   textures=[_texture(rng) for _ in range(len(tracks))],
                   background=_background(rng, width, height), pillar=(pillar_x, pillar_x + pillar_w),
                   pillar_texture=pillar_texture, grain=_grain(rng, width, height), kinds=kinds)
    for t in range(config.frames):
        _, visible = _draw(seq, t, pixels=False)
        seq.frames.append(_detect(rng, config, tracks[:, t], visible))
    return seq


def _xyxy(cxcywh: np.ndarray) -> np.ndarray:
    half = cxcywh[:, 2:] / 2
    return np.concatenate([cxcywh[:, :2] - half, cxcywh[:, :2] + half], axis=1)


def _clip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.stack([boxes[:, 0].clip(0, width), boxes[:, 1].clip(0, height), boxes[:, 2].clip(0, width),
                     boxes[:, 3].clip(0, height)], axis=1)


def _detect(rng: np.random.Generator, config: SceneConfig, state: np.ndarray, visible: np.ndarray) -> FrameTruth:
    """The truth of one frame and the simulated detector's boxes for it."""
    width, height = config.width, config.height
    seen = np.flatnonzero(visible >= VISIBLE)
    true_boxes = _clip(_xyxy(state), width, height)
    found = seen[rng.random(len(seen)) >= MISS_RATE]
    scores = np.where((visible[found] < LOW_SCORE_VISIBILITY) | (rng.random(len(found)) < LOW_SCORE_RATE),
                      rng.uniform(0.15, 0.5, len(found)), rng.uniform(0.55, 0.95, len(found)))
    wh = state[found, 2:]
    noise = rng.normal(0.0, BOX_NOISE, (len(found), 4)) * np.concatenate([wh, wh], axis=1)
    boxes = _clip(_xyxy(state[found]) + noise, width, height)
    false = int(rng.poisson(FALSE_BOXES))
    if false:
        fh = rng.uniform(50, 110, false)
        fw = fh * rng.uniform(0.4, 0.7, false)
        centre = np.stack([rng.uniform(0, width, false), rng.uniform(0, height, false)], axis=1)
        boxes = np.concatenate([boxes, _clip(_xyxy(np.concatenate([centre, np.stack([fw, fh], 1)], 1)),
                                             width, height)])
        scores = np.concatenate([scores, rng.uniform(0.1, 0.75, false)])
        found = np.concatenate([found, np.full(false, -1)])
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 4) & ((boxes[:, 3] - boxes[:, 1]) >= 4)
    return FrameTruth(gt_ids=seen.astype(np.int64), gt_boxes=true_boxes[seen].astype(np.float32),
                      det_boxes=boxes[keep].astype(np.float32), det_scores=scores[keep].astype(np.float32),
                      det_source=found[keep].astype(np.int64))
