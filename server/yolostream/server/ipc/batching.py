"""The micro-batcher's settings: chosen by the device process, reported to every front-end (``GetModelInfo``
shows them, and a front-end sizes its share of the device queue from ``queue_capacity``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatcherConfig:
    """Scheduling knobs; ``for_device`` gives defaults that suit a GPU or a CPU."""

    max_batch: int = 8
    max_delay_ms: float = 0.0
    queue_capacity: int = 256
    workers: int = 1

    @staticmethod
    def for_device(device_type: str, cores: int = 1) -> "BatcherConfig":
        """GPU: one pipelined worker. CPU: two workers (with cores/2 torch threads each, set by the server).

        On CPU a single worker's intra-op threads share the cores with decoding, gRPC and clients, and every
        parallel region waits for its preempted half; two workers keep the cores busy (measured on 2 vCPUs:
        +14-52 % end-to-end frames/s, camera-rate p50 18.6 -> 15.3 ms; see BENCHMARKS.md).
        """
        if device_type == "cuda":
            return BatcherConfig(max_batch=32, max_delay_ms=2.0, queue_capacity=512, workers=1)
        return BatcherConfig(max_batch=8, max_delay_ms=0.0, queue_capacity=128, workers=2 if cores >= 2 else 1)

    def validated(self) -> "BatcherConfig":
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be non-negative, got {self.max_delay_ms}")
        if self.queue_capacity < self.max_batch:
            raise ValueError(f"queue_capacity ({self.queue_capacity}) must be at least max_batch ({self.max_batch})")
        return self
