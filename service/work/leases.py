"""Lease deadlines and when each desktop was last heard from: kept in memory, never as events.

Behind `LeaseStore` so that nodes sharing one database can keep them in a table instead.
"""

from __future__ import annotations

from typing import Protocol


class LeaseStore(Protocol):
    def renew(self, run_id: str, deadline: float) -> None:
        """The run's lease now lasts until `deadline` (a monotonic time)."""

    def drop(self, run_id: str) -> None:
        """The run ended: it holds no lease."""

    def deadline(self, run_id: str) -> float | None: ...

    def lapsed(self, now: float) -> list[str]:
        """The runs whose lease deadline has passed."""

    def heard(self, desktop_id: str, at: float) -> None:
        """The desktop's worker was heard from at `at` (monotonic)."""

    def last_heard(self, desktop_id: str) -> float | None: ...
