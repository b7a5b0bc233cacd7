#!/usr/bin/env python
"""Benchmarks of Mission Control: `scripts/bench.py SUB [options]`, SUB one of append, replay,
verify, http, sse, run, queue, notify (`--help` lists them). The benchmarks are the package scripts/bench/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for scripts.bench and tests

from scripts.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
