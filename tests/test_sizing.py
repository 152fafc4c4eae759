"""Front-end work sized from the cores: processes and decode threads on a GPU host, the measured defaults on CPU."""

from __future__ import annotations

import pytest

from yolostream.server.common.sizing import (DECODE_MS, DEVICE_CORES, decode_capacity, default_decode_threads,
                                      default_frontends, frontend_plan)


def test_cpu_keeps_one_front_end_with_four_decode_threads():
    for cores in (1, 2, 16, 64):
        assert frontend_plan(None, None, "cpu", cores) == (1, 4)


@pytest.mark.parametrize("cores, plan", [(2, (1, 2)), (4, (1, 2)), (8, (2, 3)), (16, (5, 3)), (32, (8, 4)),
                                         (64, (8, 8)), (256, (8, 16))])
def test_cuda_sizes_front_ends_and_decode_threads_from_the_cores(cores, plan):
    assert frontend_plan(None, None, "cuda:0", cores) == plan
    frontends, threads = plan
    assert frontends == default_frontends("cuda", cores)
    assert threads == default_decode_threads("cuda", cores, frontends)
    if cores > 2 * DEVICE_CORES:
        # the decode threads use the cores the device leaves without oversubscribing them by more than a thread each
        assert frontends * threads <= cores - DEVICE_CORES + frontends


def test_settings_given_win():
    assert frontend_plan(3, None, "cuda", 16) == (3, 5)
    assert frontend_plan(None, 9, "cuda", 16) == (5, 9)
    assert frontend_plan(2, 6, "cpu", 2) == (2, 6)


def test_more_cores_never_lower_the_decode_capacity():
    capacities = []
    for cores in range(1, 129):
        frontends, threads = frontend_plan(None, None, "cuda", cores)
        capacities.append(decode_capacity(frontends, threads, cores))
    assert capacities == sorted(capacities)
    # the old default (4 threads in each of cores/4 front-ends, at most 8) decoded with 32 threads on 64 cores
    assert decode_capacity(8, 4, 64) == pytest.approx(32 * 1000 / DECODE_MS)
    assert capacities[63] == pytest.approx(62 * 1000 / DECODE_MS)
