"""`scripts/bench.py artifacts`: an artifact's upload (`PUT /tasks/{id}/artifacts/{name}`) and download
(`GET .../{sha256}`) through a real `mission-control serve` on loopback, against their floor: writing
the same bytes to a file (and fsync'ing it, as the store does) and reading them back, in the same run.
The bytes are streamed both ways from and to a file, never held whole, as a client would.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from tests.server import Server

from .common import command, database, database_options, line, ratio, workdir

PIECE = 1024 * 1024


def _mb_per_s(label: str, size: int, seconds: float) -> float:
    per_second = size / seconds / 1e6
    line(label, f"{per_second:,.0f} MB/s", f"({size / 2**20:,.0f} MiB in {seconds:.2f} s)")
    return per_second


def _pieces(path: Path):
    with open(path, "rb") as source:
        while piece := source.read(PIECE):
            yield piece


@command(
    "artifacts", "an artifact's upload and download MB/s through the server, against writing and reading a file",
    (("--mib",), {"type": int, "default": 64, "help": "the artifact's size in MiB (default 64)"}),
    *database_options(),
    (("--dir",), {"type": Path, "help": "where to put the data dir and files (default: a temporary dir)"}),
)
def bench_artifacts(args) -> None:
    size = args.mib * 2**20
    with workdir(args.dir) as where, database(args) as url:
        source = where / "artifact.bin"
        with open(source, "wb") as out:  # incompressible, like the archives and images artifacts mostly are
            for _ in range(args.mib):
                out.write(os.urandom(PIECE))
        digest = hashlib.sha256(source.read_bytes()).hexdigest()

        started = time.perf_counter()  # the floor: the same bytes to a file, durably, then read back
        copy = where / "copy.bin"
        with open(copy, "wb") as out:
            for piece in _pieces(source):
                out.write(piece)
            out.flush()
            os.fsync(out.fileno())
        written = time.perf_counter() - started
        started = time.perf_counter()
        for _ in _pieces(copy):
            pass
        read = time.perf_counter() - started

        env = {"MC_RATE_LIMIT_PER_SECOND": 0, "MC_MAX_ARTIFACT_BYTES": size + 1, **({"MC_DATABASE_URL": url} if url else {})}
        with Server(where / "data", env).start() as server:
            client = server.client(timeout=300)
            task_id = client.post("/tasks", json={"type": "command", "content": "true"}).json()["id"]
            started = time.perf_counter()
            put = client.put(f"/tasks/{task_id}/artifacts/artifact.bin", content=_pieces(source),
                             headers={"Content-Length": str(size)})
            uploaded = time.perf_counter() - started
            assert put.status_code == 201 and put.json()["sha256"] == digest, put.text
            started = time.perf_counter()
            got = hashlib.sha256()
            with client.stream("GET", f"/tasks/{task_id}/artifacts/{digest}") as answer:
                for piece in answer.iter_bytes(PIECE):
                    got.update(piece)
            downloaded = time.perf_counter() - started
            assert got.hexdigest() == digest

    print(f"artifacts: {args.mib} MiB of random bytes, one server on loopback ({'postgres' if url else 'sqlite'}),"
          " against a file on the same disk")
    up, floor_up = _mb_per_s("upload (PUT, hashed, fsync'd)", size, uploaded), _mb_per_s("file write + fsync", size, written)
    ratio(up / floor_up, None)
    down, floor_down = _mb_per_s("download (GET, streamed)", size, downloaded), _mb_per_s("file read", size, read)
    ratio(down / floor_down, None)
