"""How a server sizes its front-end work from the cores it has: front-end processes, and decode threads in each.

Torch-free and grpc-free: the supervisor, the front-ends and the benchmarks import it.
"""

from __future__ import annotations

#: Cores the device process keeps busy on a CUDA host (its worker launching kernels, the links' threads).
DEVICE_CORES = 2
#: CPU time per 640x480 JPEG frame in a front-end, in ms: decoding (OpenCV, without the GIL; BENCHMARKS.md) and
#: the rest (gRPC, letterbox, the device link, the reply; under the GIL, from the transport rows).
DECODE_MS, FRONTEND_GIL_MS = 1.85, 1.2


def default_frontends(device: str, cores: int) -> int:
    """Front-ends when ``--frontends`` is not given: 1 on CPU; on CUDA 2/5 of the cores the device leaves, 1 to 8.

    On CPU the device itself needs the cores. On a GPU host a front-end spends about FRONTEND_GIL_MS per frame
    under its GIL and DECODE_MS decoding outside it, so the GIL of each process is the serial part: about
    1.2 / (1.2 + 1.85) = 2/5 of the front-end cores should be processes, the rest decode threads
    (``default_decode_threads``). BENCHMARKS.md has the measurements behind the two costs.
    """
    if not device.startswith("cuda"):
        return 1
    return max(1, min(8, (cores - DEVICE_CORES) * 2 // 5))


def default_decode_threads(device: str, cores: int, frontends: int) -> int:
    """Decode threads per front-end when ``--decode-threads`` is not given: 4 on CPU; on CUDA each front-end's
    share of the cores the device process leaves (rounded up: more cores never mean fewer threads), 2 to 16.

    Four threads at DECODE_MS per JPEG cap a front-end near 2,000 frames/s whatever the GPU does, and OpenCV
    releases the GIL while decoding, so on a GPU host the threads follow the cores. On CPU the model needs them.

    Args:
        device: the served device (``cpu``, ``cuda``, ``cuda:N``).
        cores: cores this server may use.
        frontends: front-end processes sharing them.
    """
    if not device.startswith("cuda"):
        return 4
    return max(2, min(16, -(-(cores - DEVICE_CORES) // max(1, frontends))))


def decode_capacity(frontends: int, decode_threads: int, cores: int, decode_ms: float = DECODE_MS) -> float:
    """JPEG frames/s the front-ends can decode: their decode threads, at most the cores the device leaves, each
    decoding one frame per ``decode_ms``.

    Args:
        frontends: front-end processes.
        decode_threads: decode threads of each.
        cores: cores of the host (this server's affinity).
        decode_ms: CPU milliseconds one frame takes to decode.
    """
    busy = min(frontends * decode_threads, max(1, cores - DEVICE_CORES))
    return busy * 1000.0 / decode_ms


def frontend_plan(frontends: int | None, decode_threads: int | None, device: str, cores: int) -> tuple[int, int]:
    """(front-end processes, decode threads in each): the settings where given, else sized from ``cores``.

    Args:
        frontends: ``--frontends``, or None.
        decode_threads: ``--decode-threads``, or None.
        device: the served device.
        cores: cores this server may use.
    """
    count = frontends or default_frontends(device, cores)
    return count, decode_threads or default_decode_threads(device, cores, count)
