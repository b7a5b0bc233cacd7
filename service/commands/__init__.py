"""Command handling: load a stream's state, decide (pure deciders), append at its version, with
Idempotency-Key replays in one place."""
