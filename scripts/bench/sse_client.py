"""The subscribers of `bench.py sse`: SSE over raw asyncio protocols, so that a thousand of them
in one process are not the bottleneck. Run as a child process (`python -m scripts.bench.sse_client`),
driven over stdin/stdout by the benchmark; `Subscriber` also reads the catch-up in process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

SENT = b'"sentUs":'


class Subscriber(asyncio.Protocol):
    """One SSE connection. Undoes the chunked encoding, splits messages, and notes for each event
    its id and, if it carries `sentUs`, the latency of its arrival."""

    def __init__(self, request: bytes, ready: asyncio.Future, keep_latency: bool = True):
        self.request, self.ready = request, ready
        self.keep_latency = keep_latency
        self.head = b""
        self.raw = b""
        self.left = 0  # >0: chunk bytes to come; -2: the CRLF after a chunk; 0: a size line
        self.text = b""
        self.ids: list[int] = []
        self.latencies: list[int] = []  # microseconds
        self.last_at = 0
        self.closed = asyncio.get_running_loop().create_future()
        self.ended = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the stream started: {self.head[:200]!r}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if not self.ready.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 200"):
                self.ready.set_exception(ConnectionError(self.head[:300].decode(errors="replace")))
                return
            data, self.head = self.head[end + 4:], self.head[:end]
            self.ready.set_result(None)
        body = self._dechunk(data)
        if not body:
            return
        messages = (self.text + body).split(b"\r\n\r\n")
        self.text = messages.pop()
        for message in messages:
            if message.startswith(b"id: "):
                newline = message.find(b"\r\n")
                self.ids.append(int(message[4:newline]))
                self.last_at = now
                if self.keep_latency and (at := message.find(SENT)) >= 0:
                    start = at + len(SENT)
                    stop = start
                    while message[stop] in b"0123456789":
                        stop += 1
                    self.latencies.append(now // 1000 - int(message[start:stop]))

    def _dechunk(self, data: bytes) -> bytes:
        raw = self.raw + data if self.raw else data
        out, pos, n = [], 0, len(raw)
        while pos < n:
            if self.left > 0:
                take = min(self.left, n - pos)
                out.append(raw[pos:pos + take])
                pos += take
                self.left -= take
                if self.left == 0:
                    self.left = -2
            elif self.left == -2:
                if n - pos < 2:
                    break
                pos += 2
                self.left = 0
            else:
                newline = raw.find(b"\r\n", pos)
                if newline < 0:
                    break
                size = int(raw[pos:newline], 16)
                pos = newline + 2
                if size == 0:
                    self.ended = True
                    pos = n
                    break
                self.left = size
        self.raw = raw[pos:]
        return b"".join(out)


def request_bytes(port: int, path: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n{auth}\r\n".encode()


async def subscribe(ports: list[int], path: str, token: str | None, count: int) -> list[Subscriber]:
    """`count` subscribers, spread evenly over the servers on `ports` (subscriber n on ports[n % len])."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(64)  # connect in waves, not 1,000 SYNs at once

    async def one(port: int) -> Subscriber:
        request = request_bytes(port, path, token)
        async with gate:
            ready = loop.create_future()
            _, protocol = await loop.create_connection(lambda: Subscriber(request, ready), "127.0.0.1", port)
            await asyncio.wait_for(ready, 30)
            return protocol

    return await asyncio.gather(*(one(ports[n % len(ports)]) for n in range(count)))


class Pipe:
    """JSON lines to and from a child process: the driver's side, or the child's (stdin/stdout)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    def send(self, message) -> None:
        self.writer.write(json.dumps(message) + "\n")
        self.writer.flush()

    def recv(self):
        text = self.reader.readline()
        if not text:
            raise EOFError("the other side of the pipe is gone")
        return json.loads(text)


def client_process() -> None:
    """The subscribers, in a process of their own, driven over stdin/stdout."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_client_main(Pipe(sys.stdin, sys.stdout)))


async def _client_main(conn: Pipe) -> None:
    loop = asyncio.get_running_loop()
    subscribers: list[Subscriber] = []
    while True:
        command, arguments = await loop.run_in_executor(None, conn.recv)
        if command == "subscribe":
            started = time.perf_counter()
            subscribers = await subscribe(**arguments)
            conn.send(("ready", time.perf_counter() - started))
        elif command == "collect":
            expected: list[int] = arguments["ids"]
            deadline = time.monotonic() + arguments["timeout"]
            last = expected[-1] if expected else 0
            while time.monotonic() < deadline and any((s.ids[-1] if s.ids else 0) < last for s in subscribers):
                await asyncio.sleep(0.05)
            wanted = set(expected)
            delivered = lost = duplicated = disordered = 0
            latencies: list[int] = []
            for s in subscribers:
                got = [i for i in s.ids if i in wanted]
                delivered += len(got)
                lost += len(wanted - set(got))
                duplicated += len(got) - len(set(got))
                disordered += any(a >= b for a, b in zip(s.ids, s.ids[1:]))
                latencies += s.latencies
                s.transport.close()
            conn.send(("collected", {
                "delivered": delivered, "lost": lost, "duplicated": duplicated, "disordered": disordered,
                "latencies": sorted(latencies), "last_at": max((s.last_at for s in subscribers), default=0),
            }))
            subscribers = []
        elif command == "stop":
            return


if __name__ == "__main__":
    client_process()
