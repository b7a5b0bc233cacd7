"""`serve --processes N`: a parent that keeps N forked children serving, one per slot.

The parent does nothing but supervise: it forwards SIGTERM and SIGINT to the children as SIGTERM
(uvicorn takes a second SIGINT as "stop at once", and a terminal's Ctrl-C already sends SIGINT to
every process of the group), waits for them to drain, and starts again a child that exits while
it is not stopping. A child that exits before it was ready (it said so through a pipe) is started
again after a backoff doubling from 0.5 s; the fifth such exit in a row makes the parent stop the
others and give up. Children ask the kernel for SIGTERM should the parent die, so none is left
serving without it.

Forked rather than spawned: each child starts with what the parent has loaded and checked, the
sockets included, and the parent holds no thread, loop or connection by then (the checks before
ran in loops of their own, closed).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable

QUICK_EXITS = 5
"""Exits before readiness, in a row, after which a slot is given up (and the parent with it)."""
FIRST_BACKOFF_SECONDS = 0.5
PR_SET_PDEATHSIG = 1
STOPS = (signal.SIGTERM, signal.SIGINT)
WATCHED = (*STOPS, signal.SIGCHLD)


class _Slot:
    def __init__(self, number: int):
        self.number = number
        self.pid: int | None = None
        self.ready = False
        self.quick_exits = 0
        self.start_at: float | None = None
        """When it is to be started (again); None while it runs, or once given up."""


def supervise(count: int, child: Callable[[int, Callable[[], None]], int], on_ready: Callable[[], None]) -> str | None:
    """Run `child(slot, ready)` in `count` forked processes (slots 1..count) until SIGTERM or SIGINT,
    calling `on_ready` once every one of them has called its `ready`. Returns None once all have
    stopped on a signal, or the sentence saying why it gave up."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in WATCHED}  # handled through wake_r
    previous_wakeup = signal.set_wakeup_fd(wake_w)
    slots = {n: _Slot(n) for n in range(1, count + 1)}
    for slot in slots.values():
        slot.start_at = 0.0
    announced, stopping, gave_up = False, False, None

    def start(slot: _Slot) -> None:
        parent = os.getpid()
        sys.stdout.flush()  # else the child would write the parent's buffered lines again
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)  # none is taken by the child's copy of our handlers
        try:
            pid = os.fork()
            if pid == 0:
                _child(slot.number, child, parent, ready_w, (wake_r, wake_w, ready_r), previous)
            slot.pid, slot.ready, slot.start_at = pid, False, None
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)

    def stop_all() -> None:
        for slot in slots.values():
            slot.start_at = None
            if slot.pid is not None:
                os.kill(slot.pid, signal.SIGTERM)

    def exited(pid: int, status: int) -> None:
        nonlocal gave_up
        slot = next((s for s in slots.values() if s.pid == pid), None)
        if slot is None:
            return
        slot.pid = None
        if stopping:
            return
        code = os.waitstatus_to_exitcode(status)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        slot.quick_exits = 1 if slot.ready else slot.quick_exits + 1
        if slot.quick_exits >= QUICK_EXITS:
            gave_up = (f"process {slot.number} of {count} {how}, the {QUICK_EXITS}th time in a row before it was "
                       "ready; the others are stopped (their output above says why)")
            return
        backoff = FIRST_BACKOFF_SECONDS * 2 ** (slot.quick_exits - 1)
        print(f"mission-control: process {slot.number} of {count} (pid {pid}) {how}; starting it again in "
              f"{backoff:g} s", file=sys.stderr, flush=True)
        slot.start_at = time.monotonic() + backoff

    try:
        while True:
            now = time.monotonic()
            for slot in slots.values():
                if slot.start_at is not None and slot.start_at <= now:
                    start(slot)
            if stopping and all(slot.pid is None for slot in slots.values()):
                return gave_up
            due = [slot.start_at for slot in slots.values() if slot.start_at is not None]
            readable, _, _ = select.select([wake_r, ready_r], [], [], max(0.0, min(due) - now) if due else None)
            if wake_r in readable:
                received = os.read(wake_r, 512)
                if not stopping and any(sig in received for sig in STOPS):
                    stopping = True
                    stop_all()
            if ready_r in readable:
                for number in os.read(ready_r, 512):
                    slots[number].ready = True
                if not announced and all(slot.ready for slot in slots.values()):
                    announced = True
                    on_ready()
            while True:  # reap every child that exited, whatever woke us
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                exited(pid, status)
            if gave_up is not None and not stopping:
                stopping = True
                stop_all()
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for fd in (wake_r, wake_w, ready_r, ready_w):
            os.close(fd)


def _child(number: int, child: Callable[[int, Callable[[], None]], int], parent: int, ready_w: int,
           parents_fds: tuple[int, ...], handlers: dict) -> None:
    """In the forked child: the parent's signal handling undone, then `child`; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for fd in parents_fds:
            os.close(fd)
        if sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)
        if os.getppid() != parent:  # the parent died before the request above took effect
            os._exit(1)
        code = child(number, lambda: os.write(ready_w, bytes([number])))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - whatever it is, said, and this process ends here
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
