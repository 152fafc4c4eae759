"""A thin link on loopback: a TCP proxy that shapes each direction to a bandwidth and adds a one-way delay.

The link bench (issue 19) needs a 20 Mbit/s, 100 Mbit/s or 1 Gbit/s link between a client and a server on one
machine, without root (no ``tc``). ``ShapedLink`` listens on 127.0.0.1, forwards every connection to the target,
and models each direction as one serial line shared by every connection on it:

- a chunk read from the sender leaves when the line is free and takes ``8 · bytes / rate`` seconds on it
  (store and forward), then arrives ``one_way_ms`` later;
- the line's queue is bounded (``buffer_s`` of data at its rate): while it is full the proxy stops reading, so
  TCP's own flow control slows the sender down, as a router's full queue would;
- every delivered byte is counted with its time, so a caller can ask what crossed in any window
  (``bytes_between``).

Without a rate (``mbit_s=None``) the proxy forwards as fast as it can and only counts: the same path, unshaped.
It runs its own asyncio loop in a daemon thread; ``start`` opens it, ``stop`` closes every connection.
"""

from __future__ import annotations

import asyncio
import bisect
import socket
import threading
import time
from dataclasses import dataclass, field

#: Bytes read at once: 16 KB is 6.5 ms on a 20 Mbit/s line, fine-grained enough for frame latencies.
CHUNK = 16 * 1024
#: The proxy's own kernel receive buffers: small, so that what waits for the line waits in the sender's socket (as
#: it would before a real bottleneck) instead of in a hidden queue of megabytes inside the proxy.
RECEIVE_BUFFER = 64 * 1024
UP, DOWN = "up", "down"


@dataclass
class _Line:
    """One direction of the link: when it is next free, and a timeline of delivered bytes."""

    rate_bps: float | None
    delay_s: float
    buffer_s: float
    free_at: float = 0.0
    times: list[float] = field(default_factory=lambda: [0.0])
    totals: list[int] = field(default_factory=lambda: [0])

    def schedule(self, nbytes: int, now: float) -> float:
        """Put ``nbytes`` on the line at ``now``: the time they arrive at the far end."""
        if self.rate_bps is None:
            return now
        self.free_at = max(now, self.free_at) + nbytes * 8.0 / self.rate_bps
        return self.free_at + self.delay_s

    def backlog_s(self, now: float) -> float:
        """Seconds of data queued on the line ahead of a new chunk."""
        return max(0.0, self.free_at - now)

    def delivered(self, nbytes: int) -> None:
        # totals first: a reader in another thread that finds a time always finds its total
        self.totals.append(self.totals[-1] + nbytes)
        self.times.append(time.perf_counter())

    def total_at(self, t: float) -> int:
        return self.totals[bisect.bisect_right(self.times, t) - 1]


class ShapedLink:
    """A shaped TCP proxy in front of ``target`` (host, port). Build it, ``start()`` it, use ``address``.

    Args:
        target: where connections go.
        mbit_s: the line rate in each direction, in Mbit/s (10^6 bits); None forwards unshaped.
        one_way_ms: delay added in each direction (half the round trip).
        buffer_s: the longest queue the line holds, in seconds of data at its rate (at least two chunks' worth).
    """

    def __init__(self, target: tuple[str, int], mbit_s: float | None, one_way_ms: float = 0.0,
                 buffer_s: float = 0.05) -> None:
        self.target = target
        self.mbit_s = mbit_s
        rate = mbit_s * 1e6 if mbit_s else None
        floor = 2 * CHUNK * 8.0 / rate if rate else 0.0
        self.lines = {name: _Line(rate, one_way_ms / 1000.0, max(buffer_s, floor)) for name in (UP, DOWN)}
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "ShapedLink":
        """Listen on an ephemeral port of 127.0.0.1 and start forwarding."""
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)  # accepted sockets inherit it
            listener.bind(("127.0.0.1", 0))
            self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, sock=listener))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="shaped-link", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the shaped link did not start listening within 10 s")
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread."""
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def bytes_between(self, direction: str, t0: float, t1: float) -> int:
        """Bytes delivered in ``direction`` (``"up"``: to the server, ``"down"``: to the client) between two
        ``time.perf_counter()`` times."""
        line = self.lines[direction]
        return line.total_at(t1) - line.total_at(t0)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream = socket.socket()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        upstream.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(upstream, self.target)
            server_r, server_w = await asyncio.open_connection(sock=upstream)
        except OSError:
            upstream.close()
            client_w.close()
            return
        for reader, writer, line in ((client_r, server_w, self.lines[UP]), (server_r, client_w, self.lines[DOWN])):
            task = asyncio.ensure_future(self._pump(reader, writer, line))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: _Line) -> None:
        """One direction of one connection: read, wait for room on the line, deliver on time, in order."""
        queue: asyncio.Queue = asyncio.Queue()
        deliver = asyncio.ensure_future(self._deliver(queue, writer, line))
        try:
            while True:
                backlog = line.backlog_s(time.perf_counter())
                if backlog > line.buffer_s:
                    await asyncio.sleep(backlog - line.buffer_s)
                    continue
                data = await reader.read(CHUNK)
                if not data:
                    break
                await queue.put((line.schedule(len(data), time.perf_counter()), data))
            await queue.put(None)
            await deliver
        except (ConnectionError, OSError):
            pass
        finally:
            deliver.cancel()
            writer.close()

    @staticmethod
    async def _deliver(queue: asyncio.Queue, writer: asyncio.StreamWriter, line: _Line) -> None:
        try:
            while (item := await queue.get()) is not None:
                at, data = item
                wait = at - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                line.delivered(len(data))
        except (ConnectionError, OSError):
            pass
