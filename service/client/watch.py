"""One run as its task's events tell it: what `task run --follow` shows, asks and ends with.

Fed the task's stream from its first event (`Task.created_position`), a `RunWatch` skips what
came before the run it watches and then hands back that run's events, typed: its output, its
questions, its ending. Reading from the start, not from "now", is what makes the output whole
however late the stream connects.
"""

from __future__ import annotations

from events import RecordedEvent, decode
from events import types as t
from projections.lifecycle import LEADS_TO, Status

ENDINGS: dict[type[t.EventData], int] = {t.TaskCompleted: 0, t.TaskFailed: 1, t.TaskCancelled: 2, t.TaskReview: 3}
"""How `task run --follow` exits on each ending: 0 done, 1 failed, 2 cancelled, 3 in review."""
_TASK_EVENTS = {cls.event_type: cls for cls in LEADS_TO} | {t.TaskOutput.event_type: t.TaskOutput}


class RunWatch:
    def __init__(self, run_id: str | None = None, after_version: int = 0):
        """Watch the run `run_id`, or (None: a run still queued) the first run started after the
        task's stream version `after_version`."""
        self.run_id, self.after_version = run_id, after_version
        self.started: RecordedEvent | None = None
        self.status: Status | None = None
        self.ending: t.EventData | None = None

    def see(self, event: RecordedEvent) -> t.EventData | None:
        """The event's payload when it belongs to the watched run, else None."""
        cls = _TASK_EVENTS.get(event.type)
        if cls is None or self.ending is not None:
            return None
        data = decode(event)
        if self.started is None:
            if not isinstance(data, t.TaskStarted) or not (
                data.run_id == self.run_id if self.run_id else event.version > self.after_version
            ):
                return None
            self.started, self.run_id = event, data.run_id
        elif getattr(data, "run_id", self.run_id) != self.run_id:
            return None  # a later run's (after a retry): not this one's
        if (status := LEADS_TO.get(cls)) is not None:
            self.status = status
        if cls in ENDINGS:
            self.ending = data
        return data

    @property
    def exit_code(self) -> int | None:
        return None if self.ending is None else ENDINGS[type(self.ending)]
