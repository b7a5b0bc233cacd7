"""Background tasks a component owns, stopped together when it closes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancelled(jobs: Iterable[asyncio.Task]) -> None:
    """Cancel every job and wait until each has ended (a job that ended by itself included)."""
    jobs = list(jobs)
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
