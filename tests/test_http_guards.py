"""What the server does before any key is checked (issue 12, items 3, 5 and 17): the header
block is bounded, headers that do not arrive in time close the connection, connections are
capped, and `serve` refuses a port out of range or in use before it writes anything.

Raw sockets against a real `mission-control serve`, each read bounded by a socket timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.server import free_port

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: test\r\n"


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=15)


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def status_and_body(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_a_header_block_over_the_limit_is_refused_431_whether_it_ends_or_not(make_server):
    server = make_server()  # the default limit, 64 KiB
    with connect(server) as sock:  # just under the limit: served
        sock.sendall(HEALTHZ + b"X-Pad: " + b"a" * 60_000 + b"\r\nConnection: close\r\n\r\n")
        assert answer(sock).startswith(b"HTTP/1.1 200")
    with connect(server) as sock:  # a complete block over it
        sock.sendall(HEALTHZ + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n")
        status, body = status_and_body(answer(sock))
        assert (status, body["code"]) == (431, "headers_too_large")
        assert "65536 bytes" in body["detail"]
    with connect(server) as sock:  # a header that never ends: refused once past the limit, not buffered
        sock.sendall(HEALTHZ + b"X-Pad: ")
        try:
            for _ in range(64):  # at most 4 MiB; the server closes long before
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            response = answer(sock)
        except ConnectionResetError:  # closed with our unread bytes in its buffer: a reset, no answer to read
            response = b""
        assert response == b"" or status_and_body(response)[0] == 431
    with connect(server) as sock:  # many small headers count too
        sock.sendall(HEALTHZ + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 100) for i in range(1000)) + b"\r\n")
        assert status_and_body(answer(sock))[0] == 431


def test_a_connection_whose_headers_do_not_arrive_in_time_is_answered_408_and_closed(make_server):
    server = make_server(MC_HEADER_TIMEOUT_SECONDS="1")
    with connect(server) as sock:  # half a request line
        sock.sendall(b"GET /heal")
        status, body = status_and_body(answer(sock))
        assert (status, body["code"]) == (408, "request_timeout")
    with connect(server) as sock:  # nothing at all
        assert status_and_body(answer(sock))[0] == 408
    with connect(server) as sock:  # a first request answered, then half of a second one
        sock.sendall(HEALTHZ + b"\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: te")
        assert status_and_body(answer(sock))[0] == 408
    with connect(server) as sock:  # a slow but complete request is served
        sock.sendall(HEALTHZ)
        sock.sendall(b"Connection: close\r\n\r\n")
        assert answer(sock).startswith(b"HTTP/1.1 200")


def test_connections_past_the_cap_are_answered_503_at_once(make_server):
    server = make_server(MC_MAX_CONNECTIONS="4", MC_HEADER_TIMEOUT_SECONDS="60")
    idle = [connect(server) for _ in range(4)]
    try:
        for sock in idle:  # each accepted: a request on it is served
            sock.sendall(HEALTHZ + b"\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with connect(server) as extra:
            status, body = status_and_body(answer(extra))
            assert (status, body["code"]) == (503, "too_many_connections")
        idle.pop().close()
        with connect(server) as sock:  # a freed place is taken again (once the close has reached the server)
            sock.sendall(HEALTHZ + b"Connection: close\r\n\r\n")
            response = answer(sock)
        assert response.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503"))
    finally:
        for sock in idle:
            sock.close()


def serve(data_dir, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--data-dir", str(data_dir), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


def test_serve_refuses_a_port_out_of_range_with_a_sentence_not_a_wrap(tmp_path):
    for port in ("99999", "65536", "0"):
        result = serve(tmp_path / "data", "--port", port)
        assert result.returncode != 0
        assert "port" in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
    result = serve(tmp_path / "data", env={**os.environ, "MC_PORT": "84139"})
    assert result.returncode != 0 and "MC_PORT" in result.stderr and "84139" in result.stderr
    assert not (tmp_path / "data").exists()


def test_serve_on_a_busy_port_says_so_before_issuing_a_key(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = serve(tmp_path / "data", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode != 0
    assert result.stderr.startswith("mission-control: cannot listen on http://127.0.0.1:")
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "Issued" not in result.stdout
    assert not (tmp_path / "data" / "admin-token").exists()


def test_serve_says_where_it_listens_and_where_its_data_is_once_ready(make_server):
    server = make_server()
    output = server.output()
    assert f"listening on http://127.0.0.1:{server.port}/" in output
    assert str(server.data_dir.resolve()) in output
