"""Live numbers of a stream: a one-line status on stderr (with a progress bar when the length is known) and a
summary at the end. Hand-written, because the client does not depend on tqdm."""

from __future__ import annotations

import random
import sys
import time
from array import array
from collections import deque
from typing import Callable, TextIO

import numpy as np

from .results import TIMING_FIELDS, FeatureResult

#: Answers the live percentiles and fps are computed over.
RECENT = 300


def percentile(values: "array[float] | deque[float]", q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def progress_bar(done: int, total: int, width: int = 24) -> str:
    """``[#########...............]  37/100`` (ASCII, so any terminal encoding shows it)."""
    fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
    filled = int(round(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


class LatencySample:
    """Latencies for the summary in bounded memory: every value up to ``capacity``, then a uniform random sample
    (reservoir sampling), so a stream that runs for days keeps ~1 MB, not 8 bytes per frame; the max is exact."""

    def __init__(self, capacity: int = 100_000, seed: int = 0) -> None:
        self.capacity = capacity
        self.values: array[float] = array("d")
        self.count = 0
        self.max = 0.0
        self._rng = random.Random(seed)

    def append(self, value: float) -> None:
        self.count += 1
        self.max = max(self.max, value)
        if len(self.values) < self.capacity:
            self.values.append(value)
        else:
            slot = self._rng.randrange(self.count)
            if slot < self.capacity:
                self.values[slot] = value


class StreamStats:
    """Counts and latencies of the answers of one stream (latency and batch size from OK frames only)."""

    def __init__(self, total: int | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total = total
        self.clock = clock
        self.start = clock()
        self.answered = self.ok = self.errors = self.dropped = 0
        self.latencies = LatencySample()
        self.batch_sum = 0
        self.timing_sums = dict.fromkeys(TIMING_FIELDS, 0)
        self.recent_latency: deque[float] = deque(maxlen=RECENT)
        self.recent_times: deque[float] = deque(maxlen=RECENT)
        self.last_error = ""
        self.retried = 0

    def update(self, result: FeatureResult) -> None:
        self.answered += 1
        self.retried += result.retries > 0
        self.recent_times.append(self.clock())
        if result.status == "ok":
            self.ok += 1
            self.batch_sum += result.batch_size
            for name in TIMING_FIELDS:
                self.timing_sums[name] += result.timings_us.get(name, 0)
            if result.latency is not None:
                self.latencies.append(result.latency)
                self.recent_latency.append(result.latency)
        elif result.status == "dropped":
            self.dropped += 1
        else:
            self.errors += 1
            self.last_error = result.error

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def fps(self) -> float:
        """Answers per second over all the stream."""
        elapsed = self.elapsed
        return self.answered / elapsed if elapsed > 0 else 0.0

    def recent_fps(self) -> float:
        """Answers per second over the last RECENT answers (what a live camera is getting now)."""
        if len(self.recent_times) < 2:
            return self.fps()
        span = self.recent_times[-1] - self.recent_times[0]
        return (len(self.recent_times) - 1) / span if span > 0 else 0.0

    def mean_batch(self) -> float | None:
        return self.batch_sum / self.ok if self.ok else None

    def status_line(self) -> str:
        parts = []
        if self.total:
            parts.append(progress_bar(self.answered, self.total))
        else:
            parts.append(f"{self.answered} frames")
        batch = self.mean_batch()
        parts.append(f"{self.recent_fps():.1f} fps")
        parts.append(f"latency p50 {_ms(percentile(self.recent_latency, 50))} "
                     f"p95 {_ms(percentile(self.recent_latency, 95))} ms")
        parts.append(f"batch {batch:.1f}" if batch is not None else "batch -")
        parts.append(f"dropped {self.dropped}")
        if self.errors:
            parts.append(f"errors {self.errors}")
        return "  ".join(parts)

    def summary(self) -> str:
        elapsed = self.elapsed
        lines = [f"frames   {self.answered} answered in {elapsed:.2f} s ({self.fps():.1f} fps): {self.ok} ok, "
                 f"{self.dropped} dropped, {self.errors} error(s)"]
        if self.latencies.count:
            kept = self.latencies.values
            lines.append(f"latency  p50 {_ms(percentile(kept, 50))} ms, p95 {_ms(percentile(kept, 95))} ms, "
                         f"max {_ms(self.latencies.max)} ms (round trip)")
        if self.ok:
            means = {k: self.timing_sums[k] / self.ok / 1000 for k in TIMING_FIELDS}
            lines.append(f"server   mean batch {self.mean_batch():.2f}; per frame: queued {means['queued_us']:.1f} "
                         f"ms, decode+letterbox {means['preprocess_us']:.1f} ms, compute {means['compute_us']:.1f} "
                         f"ms, encode {means['encode_us']:.1f} ms")
        if self.errors:
            lines.append(f"errors   last: {self.last_error}")
        if self.retried:
            lines.append(f"resumed  {self.retried} frame(s) sent again to another replica after theirs failed")
        return "\n".join(lines)


class StatusLine:
    """Redraws one status line in place on a terminal (at most every ``interval`` s); elsewhere (a log file, a
    pipe) writes a plain line every ``log_interval`` s, so logs stay readable."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.2, log_interval: float = 5.0,
                 enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
        self.enabled = enabled
        self._last = float("-inf")
        self._width = 0

    def update(self, text: Callable[[], str], force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        line = text()
        if self.tty:
            pad = max(self._width - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, text: Callable[[], str]) -> None:
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        self.update(text, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
