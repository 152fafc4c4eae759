"""The staged path's policies on CPU: host blocks counted as the allocator pins them and released when over budget,
blocks sized by batch bucket, double buffering behind device events, the input bound, and cuDNN tuning only for
the warmed (shape, bucket) pairs."""

from __future__ import annotations

import contextlib
import gc

import numpy as np
import pytest
import torch

from yolostream.server.device.staging import HostPool, TuningPolicy, cudnn_benchmark, pinned_size

from conftest import cpu_runner

KEYS = [(4, "none", "float32"), (9, "avg", "float16"), (17, "max", "bfloat16")]


class FakeAllocator:
    """Stands in for the caching host allocator: hands out plain tensors and counts what it would pin."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.empties = 0

    def allocate(self, nbytes: int, pin: bool) -> torch.Tensor:
        self.sizes.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    def empty_cache(self) -> None:
        self.empties += 1


class FakeEvent:
    """A device event that is reached only when the test says so, or when someone waits for it."""

    def __init__(self, done: bool = False) -> None:
        self.done = done
        self.waited = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited += 1
        self.done = True


def _pool(budget: int, depth: int = 2) -> tuple[HostPool, FakeAllocator]:
    fake = FakeAllocator()
    return HostPool(budget, pin=True, allocate=fake.allocate, empty_cache=fake.empty_cache, depth=depth), fake


def test_pinned_size_is_the_next_power_of_two():
    assert [pinned_size(n) for n in (1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 2, 4, 4, 8, 1024, 1024, 2048]
    with pytest.raises(ValueError):
        pinned_size(0)


def test_pool_counts_rounded_sizes_and_asks_for_them():
    pool, fake = _pool(4096)
    block = pool.acquire(600)
    assert block.capacity == 1024 and block.pinned and fake.sizes == [1024]
    assert pool.held_bytes == 1024
    pool.give_back(block)
    again = pool.acquire(1000)
    assert again is block and fake.sizes == [1024] and pool.held_bytes == 1024


def test_pool_releases_idle_blocks_and_empties_the_cache_when_over_budget():
    pool, fake = _pool(4096)
    a, b = pool.acquire(1024), pool.acquire(2048)
    pool.give_back(a)
    pool.give_back(b)
    assert pool.held_bytes == 3072 and fake.empties == 0
    big = pool.acquire(2000)  # the 2048 class has an idle block: reused, nothing freed
    assert big is b and fake.empties == 0
    c = pool.acquire(1500)  # with that one in use, a second 2048 block needs room: the idle 1024 block goes
    assert c.capacity == 2048 and fake.empties == 1 and pool.held_bytes == 4096
    assert pool.stats.released == 1 and a.capacity == 0


def test_pool_never_exceeds_its_budget_and_falls_back_to_pageable_memory():
    pool, fake = _pool(4096)
    held = [pool.acquire(2048), pool.acquire(2048)]
    assert pool.held_bytes == 4096
    spill = pool.acquire(100)  # every pooled block is in use: pageable, not counted
    assert not spill.pinned and not spill.pooled and spill.capacity == 100 and pool.held_bytes == 4096
    huge = pool.acquire(3000)  # over half the budget: never pinned
    assert not huge.pinned and pool.stats.pageable == 2 and fake.sizes == [2048, 2048]
    pool.give_back(spill)
    pool.give_back(held[0])
    assert pool.acquire(2048) is held[0]


def test_pool_double_buffers_behind_device_events_and_waits_instead_of_growing():
    pool, fake = _pool(1 << 20, depth=2)
    first = pool.acquire(1000)
    gate_1 = FakeEvent()
    pool.give_back(first, gate_1)
    second = pool.acquire(1000)  # the first is still being uploaded: a second block
    assert second is not first and len(fake.sizes) == 2 and gate_1.waited == 0
    gate_2 = FakeEvent()
    pool.give_back(second, gate_2)
    third = pool.acquire(1000)  # two blocks of the class, both busy: wait for the older one, allocate nothing
    assert third is first and gate_1.waited == 1 and gate_2.waited == 0 and len(fake.sizes) == 2
    pool.give_back(third, FakeEvent(done=True))
    assert pool.acquire(1000) is third and gate_2.waited == 0


def test_lent_block_returns_only_when_every_host_array_is_gone():
    pool, fake = _pool(1 << 16)
    block = pool.acquire(64)
    block.tensor[:16] = torch.arange(16, dtype=torch.uint8)
    flat = pool.lend(block, 16)
    row = flat[4:12].view(np.float32).reshape(2, 1)[1]
    del flat
    gc.collect()
    other = pool.acquire(64)
    assert other is not block and len(fake.sizes) == 2
    pool.give_back(other)
    del row
    gc.collect()
    assert {id(pool.acquire(64)), id(pool.acquire(64))} == {id(block), id(other)} and len(fake.sizes) == 2


def test_release_idle_unpins_everything_idle():
    pool, fake = _pool(1 << 16)
    blocks = [pool.acquire(100), pool.acquire(5000)]
    for b in blocks:
        pool.give_back(b, FakeEvent())
    pool.release_idle()
    assert pool.held_bytes == 0 and fake.empties == 1 and all(b.capacity == 0 for b in blocks)


@pytest.fixture(scope="module")
def direct():
    return cpu_runner(64)


def _staged(budget: int = 1 << 30):
    runner = cpu_runner(64, staged=True)
    fake = FakeAllocator()
    runner.configure_staging(pool=HostPool(budget, allocate=fake.allocate, empty_cache=fake.empty_cache))
    return runner, fake


def _frames(n, hw=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(n)]


def test_output_blocks_are_sized_by_bucket_and_none_is_allocated_after_warm_up():
    runner, fake = _staged()
    runner.warmup(max_batch=8, frame_sizes=())
    deepest = [(runner.card().deepest_feature, "none", "float32")]
    deepest_row = next(r for r in runner.catalogue() if r.index == runner.card().deepest_feature)
    per_frame = int(np.prod(deepest_row.shape[-3:])) * 4
    warmed_sizes = sorted(set(fake.sizes))
    for bucket in (1, 2, 4, 8):
        assert pinned_size(per_frame * bucket) in warmed_sizes
        assert pinned_size(64 * 64 * 3 * bucket) in warmed_sizes
    allocated = len(fake.sizes)
    for n in range(1, 9):
        done = runner.collect(runner.launch(_frames(n, seed=n), deepest))
        assert done.host[deepest[0]].shape[0] == n
        del done
    assert len(fake.sizes) == allocated, "a warmed shape and layer allocated a host block mid-stream"


def test_staged_path_within_a_tiny_budget_spills_to_pageable_memory_and_stays_exact(direct):
    runner, fake = _staged(budget=64 * 1024)
    runner.warmup(max_batch=4, frame_sizes=())
    frames = _frames(3, seed=7)
    got = runner.collect(runner.launch(frames, KEYS))
    want = direct.launch(frames, KEYS)
    assert runner.pool.held_bytes <= 64 * 1024 and runner.pool.stats.pageable > 0
    for key in KEYS:
        assert got.host[key].dtype == want.host[key].dtype
        np.testing.assert_array_equal(got.host[key], want.host[key])


def test_staged_path_refuses_inputs_over_the_largest_model_input():
    runner = cpu_runner(64, staged=True)
    runner.configure_staging(1 << 24, max_imgsz=64)
    assert runner.max_input_hw == (64, 64)
    with pytest.raises(ValueError, match="over the largest model input 64x64"):
        runner.launch(_frames(1, hw=(64, 96)), KEYS)
    assert runner.collect(runner.launch(_frames(1, hw=(64, 64)), KEYS)).host[KEYS[0]].shape[0] == 1


def test_cuda_tunes_exactly_the_warmed_shape_and_bucket_pairs():
    runner, _ = _staged()
    runs: list[bool] = []

    def record(tuned: bool):
        runs.append(tuned)
        return contextlib.nullcontext()

    runner.tuning = TuningPolicy(apply=record)
    runner.warmup(max_batch=4, imgsz=64, frame_sizes=((48, 64), (36, 64)))
    shapes = {runner.input_hw(64)} | {runner.preprocess(np.zeros((h, w, 3), np.uint8))[0].shape[:2]
                                      for h, w in ((48, 64), (36, 64))}
    expected = {(hw, b) for hw in shapes for b in (1, 2, 4)}
    assert runner.tuning.warmed == expected
    assert runs == [True] * (2 * len(expected))
    runs.clear()
    keys = KEYS[:1]
    runner.collect(runner.launch(_frames(3, hw=(64, 64)), keys))  # warmed shape, bucket 4
    runner.collect(runner.launch(_frames(2, hw=(32, 64)), keys))  # another aspect ratio: never tuned
    runner.collect(runner.launch(_frames(5, hw=(64, 64)), keys))  # past the largest bucket: never tuned
    assert runs == [True, False, False]
    assert runner.tuning.untuned == {((32, 64), 2), ((64, 64), 5)}


def test_cudnn_benchmark_is_scoped_to_the_forward():
    before = torch.backends.cudnn.benchmark
    seen = []
    runner, _ = _staged()

    def record(tuned: bool):
        @contextlib.contextmanager
        def scope():
            with cudnn_benchmark(tuned):
                seen.append(torch.backends.cudnn.benchmark)
                yield

        return scope()

    runner.tuning = TuningPolicy(apply=record)
    runner.warmup(max_batch=2, frame_sizes=())
    runner.collect(runner.launch(_frames(1, hw=(32, 64)), KEYS[:1]))
    assert seen == [True] * 4 + [False]
    assert torch.backends.cudnn.benchmark == before
