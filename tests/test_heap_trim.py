"""When a server's processes give freed heap back (issue 21 item 6): every child once it goes quiet after work,
a front-end also shortly after calls end. The logic only; ``test_heap_after_floods.py`` measures a real server."""

from __future__ import annotations

import asyncio
import platform

from yolostream.server.common.lifecycle import QuietAfterWork, malloc_trim
from yolostream.server.frontend.heap import HeapTrimmer


def test_quiet_after_work_fires_once_per_quiet_spell_and_never_for_a_process_that_never_worked():
    detector = QuietAfterWork(period_s=2.0, quiet_cpu=0.05, drop=0.25)  # quiet: under 0.1 CPU s in a period
    seen = [detector.quiet_again(cpu) for cpu in (0.0, 0.01, 0.0, 1.5, 0.4, 0.02, 0.0, 0.0, 0.3, 0.09, 0.1)]
    assert seen == [False, False, False, False, False, True, False, False, False, True, False]


def test_a_fall_to_a_quarter_of_the_busiest_period_counts_as_quiet_but_steady_work_does_not():
    detector = QuietAfterWork(period_s=2.0, quiet_cpu=0.05, drop=0.25)
    steady = [0.4, 0.5, 0.3, 0.45, 0.35]  # a camera's stream: never a quarter of its busiest period
    burst = [3.6, 3.8, 0.4, 0.45, 0.4]  # a flood over, the camera still streaming: quiet once, then steady again
    assert [detector.quiet_again(cpu) for cpu in steady + burst] == [False] * 7 + [True, False, False]


def test_calls_ending_together_share_one_trim_and_a_later_end_gets_its_own():
    async def main() -> list[int]:
        trims: list[int] = []
        trimmer = HeapTrimmer(delay_s=0.01, trim=lambda: trims.append(1) is None)
        for _ in range(5):  # in one turn of the loop: the trim cannot have run in between
            trimmer.call_ended()
        for _ in range(1000):
            if trimmer.trims:
                break
            await asyncio.sleep(0.01)
        assert trimmer.trims == 1
        trimmer.call_ended()
        for _ in range(1000):
            if trimmer.trims == 2:
                break
            await asyncio.sleep(0.01)
        return trims

    assert asyncio.run(main()) == [1, 1]


def test_malloc_trim_runs_on_glibc():
    assert malloc_trim() == (platform.libc_ver()[0] == "glibc")
