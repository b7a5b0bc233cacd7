"""`mission-control task|approval|agent|desktop|overview|tail`: the command line as a client of a
running server, built on service/client/http.py. Tables for people, `--json` for scripts (the
server's own JSON, one document, or one event a line for `tail`).

Exit codes: 0 success; `task run --follow` exits with the run's outcome, 1 failed, 2 cancelled,
3 in review; every error is one sentence on stderr and exit 4 (distinct from those outcomes);
130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from events import RecordedEvent
from events import types as t
from projections.tasks import Task
from service.client.http import DEFAULT_PATIENCE, DEFAULT_SERVER, ApiError, Client
from service.client.watch import RunWatch

ERROR_EXIT = 4
INTERRUPTED_EXIT = 130
STATUS_STYLES = {
    "pending": "", "queued": "blue", "running": "cyan", "awaiting_input": "magenta", "review": "yellow",
    "done": "green", "failed": "red", "cancelled": "dim", "active": "green", "paused": "yellow", "stopped": "dim",
    "error": "red", "online": "green", "offline": "dim", "draining": "yellow", "approved": "green",
    "rejected": "red",
}


class Failed(Exception):
    """A sentence for the user; the command exits ERROR_EXIT."""


# --- output --------------------------------------------------------------------------------------


class Out:
    """Where a command writes: the server's JSON with `--json`, rich tables otherwise."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        # Piped, a table is as wide as its cells rather than cut at 80 columns.
        self.console = Console(highlight=False, width=None if sys.stdout.isatty() else 400)

    def json(self, value: Any) -> None:
        sys.stdout.buffer.write(msgspec.json.encode(value) + b"\n")
        sys.stdout.flush()

    def show(self, value: Any, view: Callable[[Any], Any]) -> None:
        if self.as_json:
            self.json(value)
        else:
            self.print(view(value))

    def print(self, renderable: Any) -> None:
        if self.console.is_terminal:
            self.console.print(renderable)
            return
        with self.console.capture() as captured:  # piped: without the cells' padding at the ends of lines
            self.console.print(renderable)
        sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
        sys.stdout.flush()


def _styled(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def _table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _pairs(rows: Iterable[tuple[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in rows:
        if value not in (None, "", [], {}):
            grid.add_row(key, value if isinstance(value, Text) else Text(str(value)))
    return grid


def _short(text: str | None, width: int = 60) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def usage_text(usage) -> str:
    """`$0.0005253 for 1234 prompt + 567 completion tokens`, and how many runs that leaves out."""
    text = f"${usage.cost_usd} for {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
    return text + (f" ({usage.unpriced_runs} runs not priced)" if usage.unpriced_runs else "")


def task_view(task: Task) -> Table:
    return _pairs([
        ("id", task.id), ("title", task.title), ("status", _styled(task.status)), ("type", task.type),
        ("content", task.content), ("description", task.description), ("priority", task.priority),
        ("project", task.project_id), ("agent", task.agent_id), ("desktop", task.desktop_id),
        ("requires approval", "yes" if task.requires_approval else None), ("runs", task.runs),
        ("run", task.run_id), ("asks", task.input_prompt), ("result", task.result), ("error", task.error),
        ("depends on", ", ".join(task.depends_on)), ("metadata", msgspec.json.encode(task.metadata).decode()
                                                   if task.metadata else None),
        ("watchers", ", ".join(task.watchers)), ("created", f"{task.created_at} by {task.created_by}"),
        ("started", task.started_at), ("completed", task.completed_at), ("version", task.version),
        ("archived", "yes" if task.archived else None), ("usage", usage_text(task.usage) if task.runs else None),
    ])


def tasks_table(tasks: list[Task]) -> Table:
    table = _table("ID", "STATUS", "TYPE", "PRIORITY", "RUNS", "TITLE", "CREATED")
    for task in tasks:
        table.add_row(task.id, _styled(task.status), task.type, str(task.priority), str(task.runs),
                      _short(task.title or task.content), task.created_at)
    return table


def runs_table(runs: list) -> Table:
    table = _table("RUN", "ID", "STATUS", "AGENT", "DESKTOP", "STARTED", "ENDED", "EXIT", "REASON")
    for run in runs:
        table.add_row(str(run.number), run.run_id, _styled(run.status), run.agent_id, run.desktop_id or "",
                      run.started_at, run.ended_at or "", "" if run.exit_code is None else str(run.exit_code),
                      run.reason or "")
    return table


def approvals_table(approvals: list) -> Table:
    table = _table("ID", "TASK", "STATUS", "CREATED", "TITLE")
    for approval in approvals:
        summary = approval.task
        table.add_row(approval.id, approval.task_id, _styled(approval.status), approval.created_at,
                      _short(summary and (summary.title or summary.content)))
    return table


def approval_view(approval) -> Table:
    return _pairs([("id", approval.id), ("task", approval.task_id), ("status", _styled(approval.status)),
                   ("resolved", approval.resolved_at and f"{approval.resolved_at} by {approval.resolved_by}"),
                   ("feedback", approval.feedback)])


def agents_table(agents: list) -> Table:
    table = _table("ID", "NAME", "KIND", "STATUS", "CREATED", "COST")
    for agent in agents:
        table.add_row(agent.id, agent.name, agent.kind, _styled(agent.status), agent.created_at,
                      f"${agent.usage.cost_usd}")
    return table


def desktops_table(desktops: list) -> Table:
    table = _table("NAME", "STATUS", "AGENTS", "BUSY", "LAST SEEN", "VERSION")
    for desktop in desktops:
        table.add_row(desktop.id, _styled(desktop.status), ",".join(desktop.agents),
                      f"{desktop.busy}/{desktop.capacity}", desktop.last_seen_at, desktop.version)
    return table


def overview_view(overview) -> Table:
    tasks = " ".join(f"{status} {count}" for status, count in overview.tasks.items())
    memory = overview.resources.memory
    return _pairs([
        ("tasks", tasks), ("runs at once", f"at most {overview.max_concurrent}"),
        ("approvals pending", str(overview.approvals_pending)), ("desktops online", str(overview.active_desktops)),
        ("agents active", str(overview.active_agents)),
        ("resources", f"cpu {overview.resources.cpu:.1f}%, memory {memory.used}/{memory.total} MiB "
                      f"({memory.percent:.1f}%)"),
        ("log", f"head {overview.log.head}, {overview.log.streams} streams"),
        ("usage", usage_text(overview.usage)),
    ])


# --- the commands --------------------------------------------------------------------------------


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise Failed(f"{option} is not JSON ({exc}): give an object, like '{{\"key\": \"value\"}}'") from None
    if not isinstance(value, dict):
        raise Failed(f"{option} must be a JSON object, like '{{\"key\": \"value\"}}'")
    return value


def _content(args) -> str:
    if (args.content is None) == (args.file is None):
        raise Failed("give the task's content with --content TEXT or --file PATH (- for stdin), one of the two")
    if args.content is not None:
        return args.content
    try:
        return sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as exc:
        raise Failed(f"cannot read {args.file}: {exc.strerror}") from None


def task_create(mc: Client, args, out: Out) -> int:
    fields = {
        "title": args.title, "description": args.description, "desktopId": args.desktop,
        "agentId": mc.agent_id(args.agent) if args.agent else None, "projectId": args.project,
        "requiresApproval": args.requires_approval, "priority": args.priority, "timeoutSeconds": args.timeout,
        "metadata": _json_object(args.metadata, "--metadata") if args.metadata else None,
        "dependsOn": [d.strip() for ds in args.depends_on or [] for d in ds.split(",") if d.strip()] or None,
        "webhookUrl": args.webhook,
    }
    task = mc.create_task(args.type, _content(args), idempotency_key=args.idempotency_key,
                          **{k: v for k, v in fields.items() if v is not None})
    out.show(task, task_view)
    return 0


def task_list(mc: Client, args, out: Out) -> int:
    page = mc.list_tasks(status=args.status, desktopId=args.desktop, agentId=args.agent and mc.agent_id(args.agent),
                         projectId=args.project, search=args.search, archived=args.archived, sort=args.sort,
                         limit=args.limit, offset=args.offset)
    if out.as_json:
        out.json(page.items)
        return 0
    out.print(tasks_table(page.items))
    if page.total > len(page.items):
        print(f"{len(page.items)} of {page.total} tasks; --offset and --limit page through them", file=sys.stderr)
    return 0


def task_show(mc: Client, args, out: Out) -> int:
    out.show(mc.task(args.task_id), task_view)
    return 0


def task_run(mc: Client, args, out: Out) -> int:
    task = mc.run_task(args.task_id, agent_id=args.agent and mc.agent_id(args.agent), queue=args.queue or None,
                       queue_timeout_seconds=args.queue_timeout)
    if not args.follow:
        out.show(task, task_view)
        return 0
    return follow(mc, task, out)


def task_cancel(mc: Client, args, out: Out) -> int:
    out.show(mc.cancel_task(args.task_id, args.reason), task_view)
    return 0


def task_retry(mc: Client, args, out: Out) -> int:
    out.show(mc.retry_task(args.task_id), task_view)
    return 0


def task_message(mc: Client, args, out: Out) -> int:
    out.show(mc.send_message(args.task_id, args.text), lambda accepted: f"sent to the run of task {accepted.task_id}")
    return 0


def task_review(mc: Client, args, out: Out) -> int:
    out.show(mc.review_task(args.task_id, args.decision, args.feedback), task_view)
    return 0


def task_output(mc: Client, args, out: Out) -> int:
    text = mc.output(args.task_id, args.run)
    if out.as_json:
        out.json({"taskId": args.task_id, "runId": args.run, "output": text})
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


def task_runs(mc: Client, args, out: Out) -> int:
    out.show(mc.runs(args.task_id), runs_table)
    return 0


def approval_list(mc: Client, args, out: Out) -> int:
    out.show(mc.approvals(args.status), approvals_table)
    return 0


def approval_resolve(mc: Client, args, out: Out) -> int:
    out.show(mc.resolve_approval(args.approval_id, args.decision, args.feedback), approval_view)
    return 0


def agent_list(mc: Client, args, out: Out) -> int:
    out.show(mc.agents(), agents_table)
    return 0


def agent_create(mc: Client, args, out: Out) -> int:
    config = _json_object(args.config, "--config") if args.config else {}
    out.show(mc.create_agent(args.name, args.kind, config), lambda agent: agents_table([agent]))
    return 0


def agent_pause(mc: Client, args, out: Out) -> int:
    out.show(mc.pause_agent(mc.agent_id(args.agent)), lambda agent: agents_table([agent]))
    return 0


def agent_resume(mc: Client, args, out: Out) -> int:
    out.show(mc.resume_agent(mc.agent_id(args.agent)), lambda agent: agents_table([agent]))
    return 0


def desktop_list(mc: Client, args, out: Out) -> int:
    out.show(mc.desktops(), desktops_table)
    return 0


def desktop_drain(mc: Client, args, out: Out) -> int:
    out.show(mc.drain_desktop(args.desktop), lambda desktop: desktops_table([desktop]))
    return 0


def desktop_resume(mc: Client, args, out: Out) -> int:
    out.show(mc.resume_desktop(args.desktop), lambda desktop: desktops_table([desktop]))
    return 0


def overview(mc: Client, args, out: Out) -> int:
    out.show(mc.overview(), overview_view)
    return 0


# --- task run --follow ----------------------------------------------------------------------------


class _Display:
    """The run's output as it is written, and on a terminal a status line under it (its status and
    how long it has run) redrawn by rich. Output lines pass above the status line whole; a partial
    line waits for its end (or for a question, or the run's end)."""

    def __init__(self, task: Task):
        self.task, self.status, self.started_at = task, task.status, None
        on_stdout = sys.stdout.isatty()
        self.console = Console(stderr=not on_stdout, highlight=False)
        self.live = Live(self, console=self.console, transient=True, refresh_per_second=8) \
            if self.console.is_terminal else None
        self.through_live = self.live is not None and on_stdout
        self.partial, self.partial_style = "", ""
        self.spinner = Spinner("dots")

    def __rich__(self) -> Spinner:
        elapsed = ""
        if self.started_at is not None:
            seconds = max(0, int((datetime.now(UTC) - self.started_at).total_seconds()))
            elapsed = f" · {seconds // 60}:{seconds % 60:02d}"
        self.spinner.text = Text.assemble((self.status, STATUS_STYLES.get(self.status, "")), elapsed,
                                          f" · task {_short(self.task.title or self.task.content, 40)}")
        return self.spinner

    def __enter__(self) -> _Display:
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()
        if self.live:
            self.live.stop()

    def started(self, recorded_at: str) -> None:
        self.started_at = datetime.fromisoformat(recorded_at.replace("Z", "+00:00"))

    def write(self, stream: str, chunk: str) -> None:
        """The agent's stderr goes to stderr (in red above the status line), the rest to stdout."""
        if not self.through_live:
            out = sys.stderr if stream == "stderr" else sys.stdout
            out.write(chunk)
            out.flush()
            return
        style = "red" if stream == "stderr" else ""
        if style != self.partial_style:
            self.flush()
        self.partial_style = style
        lines, newline, self.partial = (self.partial + chunk).rpartition("\n")
        if newline:
            self.console.print(Text(lines, style=style), soft_wrap=True)

    def flush(self) -> None:
        if self.partial:
            self.console.print(Text(self.partial, style=self.partial_style), soft_wrap=True)
            self.partial = ""

    def ask(self, question: str) -> str | None:
        """The answer to the agent's question: a prompt on a terminal, else a line of stdin (None at its end)."""
        self.flush()
        if not sys.stdin.isatty():
            line = sys.stdin.readline()
            return line.removesuffix("\n") if line else None
        if self.live:
            self.live.stop()
        try:
            return Console(stderr=True).input(Text.assemble(("? ", "bold magenta"), question or "The agent asks",
                                                            " "))
        except EOFError:
            return None
        finally:
            if self.live:
                self.live.start()


ENDING_WORDS = {0: "done", 1: "failed", 2: "cancelled", 3: "in review"}


def follow(mc: Client, task: Task, out: Out) -> int:
    """Shows the run `task` has just started (or queued) until it ends; its outcome is the exit code."""
    watch = RunWatch(task.run_id if task.status != "queued" else None, task.version)
    stdin_closed = False
    with _Display(task) as display:
        for event in mc.stream(max(0, task.created_position - 1), task_id=task.id):
            data = watch.see(event)
            if data is None:
                continue
            display.status = watch.status or display.status
            if isinstance(data, t.TaskStarted):
                display.started(event.recorded_at)
            elif isinstance(data, t.TaskOutput):
                display.write(data.stream, data.chunk)
            elif isinstance(data, t.TaskInputRequested) and not stdin_closed:
                stdin_closed = _answer(mc, task.id, data, display)
            if watch.exit_code is not None:
                break
    code = watch.exit_code
    ending = watch.ending
    detail = ""
    if isinstance(ending, t.TaskFailed):
        detail = f" ({ending.reason}): {ending.error}"
    elif isinstance(ending, t.TaskCancelled) and ending.reason:
        detail = f": {ending.reason}"
    elif isinstance(ending, t.TaskReview):
        detail = f"; decide with `mission-control task review {task.id} approve` (or reject)"
    print(f"task {task.id} {ENDING_WORDS[code]}{detail}", file=sys.stderr)
    return code


def _answer(mc: Client, task_id: str, asked: t.TaskInputRequested, display: _Display) -> bool:
    """Asks the person, sends their answer; True once stdin has nothing more to give."""
    now = mc.task(task_id)
    if now.status != "awaiting_input" or now.run_id != asked.run_id:
        return False  # answered already (another client, or a replay of an older question)
    answer = display.ask(asked.prompt)
    if answer is None:
        print(f"mission-control: stdin is closed, so the question stays open: answer it with "
              f"`mission-control task message {task_id} TEXT`", file=sys.stderr)
        return True
    try:
        mc.send_message(task_id, answer)
    except ApiError as exc:  # e.g. answered elsewhere meanwhile
        print(f"mission-control: {exc}", file=sys.stderr)
    return False


# --- tail -------------------------------------------------------------------------------------------


def _saved_position(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise Failed(f"cannot read {path}: {exc.strerror}") from None
    if not text.isdigit():
        raise Failed(f"{path} holds no log position (a whole number), so tail cannot resume from it")
    return int(text)


def _save_position(path: Path, position: int) -> None:
    """Written aside and renamed over FILE: a crash leaves the old position or the new, never half of one."""
    aside = path.with_name(path.name + ".tmp")
    aside.write_text(f"{position}\n")
    os.replace(aside, path)


def _event_line(event: RecordedEvent) -> Text:
    payload = bytes(event.payload).decode()
    if len(payload) > 200:
        payload = payload[:199] + "…"
    style = "red" if event.type.endswith(("failed", "revoked")) else "green" if event.type.endswith(
        "completed") else "cyan"
    return Text.assemble((f"{event.position:>6}", "dim"), f"  {event.recorded_at}  ", (event.type, style),
                         f"  {event.stream}  ", payload)


def tail(mc: Client, args, out: Out) -> int:
    resume = Path(args.resume) if args.resume else None
    if resume is not None:
        after = _saved_position(resume)
    elif args.from_ is not None:
        after = args.from_
    else:
        after = mc.overview().log.head
    encoder = msgspec.json.Encoder()
    for event in mc.stream(after, types=args.types, task_id=args.task, idle=args.until_idle):
        if out.as_json:
            sys.stdout.buffer.write(encoder.encode(event) + b"\n")
            sys.stdout.flush()
        else:
            out.console.print(_event_line(event), soft_wrap=True)
        if resume is not None:
            _save_position(resume, event.position)
    return 0


# --- the parser ------------------------------------------------------------------------------------


def _token(args) -> str:
    """The key: --token, --token-file, then MC_TOKEN, MC_TOKEN_FILE."""
    for value, is_file in ((args.token, False), (args.token_file, True), (os.environ.get("MC_TOKEN"), False),
                           (os.environ.get("MC_TOKEN_FILE"), True)):
        if value:
            return _read_token(Path(value)) if is_file else value
    raise Failed("no API key: give --token KEY or --token-file FILE (or set MC_TOKEN or MC_TOKEN_FILE); "
                 "`mission-control token create` issues one")


def _read_token(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise Failed(f"the token file {path} may be read by others (mode {stat.S_IMODE(mode):04o}): "
                         f"`chmod 600 {path}` first")
        lines = path.read_text().split()
    except OSError as exc:
        raise Failed(f"cannot read the token file {path}: {exc.strerror}") from None
    if not lines:
        raise Failed(f"the token file {path} is empty")
    return lines[0]


def _patience(args) -> float:
    if args.patience is not None:
        return args.patience
    raw = os.environ.get("MC_PATIENCE", str(DEFAULT_PATIENCE))
    try:
        return float(raw)
    except ValueError:
        raise Failed(f"MC_PATIENCE is {raw!r}, not a number of seconds") from None


def _retrying(error: ApiError, seconds: float) -> None:
    stop = "" if str(error).endswith((".", "?", "!", ")")) else "."
    print(f"mission-control: {error}{stop} Trying again in {seconds:g} s.", file=sys.stderr, flush=True)


def _run(fn: Callable[[Client, Any, Out], int]) -> Callable[[Any], int]:
    def command(args) -> int:
        try:
            with Client(args.server or os.environ.get("MC_SERVER") or DEFAULT_SERVER, _token(args),
                        patience=_patience(args), on_retry=_retrying) as mc:
                return fn(mc, args, Out(args.json))
        except (ApiError, Failed) as exc:
            print(f"mission-control: {exc}", file=sys.stderr)
            return ERROR_EXIT
        except KeyboardInterrupt:
            print("mission-control: interrupted (a run goes on: `mission-control task cancel ID` stops it)",
                  file=sys.stderr)
            return INTERRUPTED_EXIT
    return command


def _options() -> argparse.ArgumentParser:
    """The options every client command takes."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument("--server", metavar="URL",
                       help=f"the server's URL (env MC_SERVER; default {DEFAULT_SERVER})")
    group.add_argument("--token", metavar="KEY", help="an API key (env MC_TOKEN)")
    group.add_argument("--token-file", metavar="FILE",
                       help="a file holding the key, readable by its owner alone, e.g. var/admin-token "
                            "(env MC_TOKEN_FILE)")
    group.add_argument("--patience", type=float, metavar="SECONDS",
                       help="how long to keep trying a request answered 429 (the concurrency limit, a full "
                            "desktop, the rate limit) after its Retry-After; 0: not at all (default 60; "
                            "env MC_PATIENCE)")
    common.add_argument("--json", action="store_true", help="the server's JSON instead of a table, for scripts")
    return common


def register(commands) -> None:
    """Adds the client commands to `mission-control`'s subcommands."""
    common = _options()

    def group(name: str, help_: str, example: str):
        sub = commands.add_parser(name, help=help_, description=help_, epilog=f"Example: {example}")
        return sub.add_subparsers(dest=f"{name}_action", required=True, metavar="ACTION")

    def action(actions, name: str, fn, help_: str, example: str):
        sub = actions.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                                 epilog=f"Example: {example}", parents=[common])
        sub.set_defaults(fn=_run(fn))
        return sub

    task = group("task", "Create, run, follow and review tasks on a running server.",
                 "mission-control task run 5375f8ff-… --follow")
    sub = action(task, "create", task_create, "create a task",
                 "mission-control task create --type prompt --title Hello --content 'Say hello'")
    sub.add_argument("--type", required=True, choices=["prompt", "command"], help="a prompt for an agent, or a "
                     "command for a shell agent")
    sub.add_argument("--content", help="what to do (or --file)")
    sub.add_argument("--file", metavar="PATH", help="read the content from PATH (- for stdin)")
    sub.add_argument("--title")
    sub.add_argument("--description")
    sub.add_argument("--desktop", metavar="NAME", help="the desktop that must run it")
    sub.add_argument("--agent", metavar="AGENT", help="its agent, by name or id (default: echo)")
    sub.add_argument("--project", metavar="ID", help="its project (default: your own)")
    sub.add_argument("--requires-approval", action=argparse.BooleanOptionalAction, default=None,
                     help="a finished run waits in review for a decision (default: the server's setting)")
    sub.add_argument("--priority", type=int, help="1 to 10, 10 first (default 5)")
    sub.add_argument("--timeout", type=int, metavar="SECONDS", help="a run's time limit (default: the server's)")
    sub.add_argument("--metadata", metavar="JSON", help="a JSON object kept with the task")
    sub.add_argument("--depends-on", action="append", metavar="ID",
                     help="a task whose result this one needs (repeat it, or a comma list)")
    sub.add_argument("--webhook", metavar="URL", help="told of the task's changes")
    sub.add_argument("--idempotency-key", metavar="KEY",
                     help="sent again with the same fields, creates nothing twice")

    sub = action(task, "list", task_list, "list tasks, newest first",
                 "mission-control task list --status pending,running --search hello")
    sub.add_argument("--status", help="one status or a comma list")
    sub.add_argument("--desktop", metavar="NAME")
    sub.add_argument("--agent", metavar="AGENT", help="by name or id")
    sub.add_argument("--project", metavar="ID")
    sub.add_argument("--search", metavar="TEXT", help="a substring of the title or content")
    sub.add_argument("--archived", choices=["true", "false", "all"], help="archived tasks (default false)")
    sub.add_argument("--sort", choices=["newest", "queue"], help="newest first (the default), or queued tasks in "
                     "the order they will start")
    sub.add_argument("--limit", type=int, help="at most this many (default 50, at most 500)")
    sub.add_argument("--offset", type=int, help="skip this many")

    sub = action(task, "show", task_show, "show a task", "mission-control task show 5375f8ff-…")
    sub.add_argument("task_id", metavar="ID")

    sub = action(task, "run", task_run, "start a run of a pending task; --follow shows it until it ends and exits "
                 "0 done, 1 failed, 2 cancelled, 3 in review", "mission-control task run 5375f8ff-… --follow")
    sub.add_argument("task_id", metavar="ID")
    sub.add_argument("--agent", metavar="AGENT", help="the agent, by name or id (default: the task's, else echo)")
    sub.add_argument("--queue", action="store_true", help="wait in the queue when no slot, desktop or dependency "
                     "allows it now (answered queued, with its position)")
    sub.add_argument("--queue-timeout", type=int, metavar="SECONDS", help="with --queue: fail it queue_timeout if it "
                     "has not started by then")
    sub.add_argument("--follow", action="store_true",
                     help="stream its output, answer its questions, exit with its outcome")

    sub = action(task, "cancel", task_cancel, "cancel a task and stop its run",
                 "mission-control task cancel 5375f8ff-… --reason 'changed my mind'")
    sub.add_argument("task_id", metavar="ID")
    sub.add_argument("--reason")

    sub = action(task, "retry", task_retry, "put a failed or cancelled task back to pending",
                 "mission-control task retry 5375f8ff-…")
    sub.add_argument("task_id", metavar="ID")

    sub = action(task, "message", task_message, "send a message to the running agent (an answer to its question)",
                 "mission-control task message 5375f8ff-… Mars")
    sub.add_argument("task_id", metavar="ID")
    sub.add_argument("text", metavar="TEXT")

    sub = action(task, "review", task_review, "approve or reject a task in review",
                 "mission-control task review 5375f8ff-… reject --feedback 'Too short'")
    sub.add_argument("task_id", metavar="ID")
    sub.add_argument("decision", choices=["approve", "reject"])
    sub.add_argument("--feedback")

    sub = action(task, "output", task_output, "print a run's output as the agent wrote it",
                 "mission-control task output 5375f8ff-…")
    sub.add_argument("task_id", metavar="ID")
    sub.add_argument("--run", metavar="RUN", help="the run's id (default: the current or last)")

    sub = action(task, "runs", task_runs, "list a task's runs, oldest first", "mission-control task runs 5375f8ff-…")
    sub.add_argument("task_id", metavar="ID")

    approval = group("approval", "List and resolve the approvals that reviews open.", "mission-control approval list")
    sub = action(approval, "list", approval_list, "list approvals, oldest first",
                 "mission-control approval list --status all")
    sub.add_argument("--status", default="pending", choices=["pending", "approved", "rejected", "all"])
    sub = action(approval, "resolve", approval_resolve, "approve or reject: the task moves to done or failed",
                 "mission-control approval resolve 0b7e…  approve --feedback 'Ship it'")
    sub.add_argument("approval_id", metavar="ID")
    sub.add_argument("decision", choices=["approve", "reject"])
    sub.add_argument("--feedback")

    agent = group("agent", "List, register, pause and resume agents.", "mission-control agent list")
    action(agent, "list", agent_list, "list agents", "mission-control agent list")
    sub = action(agent, "create", agent_create, "register an agent (a shell agent: admin only)",
                 "mission-control agent create --name sh --kind shell")
    sub.add_argument("--name", required=True)
    sub.add_argument("--kind", required=True, choices=["shell", "exec", "openai", "echo"])
    sub.add_argument("--config", metavar="JSON", help="the kind's settings, a JSON object")
    for name, fn, does in (("pause", agent_pause, "pause an agent: runs on it are refused"),
                           ("resume", agent_resume, "resume a paused agent")):
        sub = action(agent, name, fn, does, f"mission-control agent {name} sh")
        sub.add_argument("agent", metavar="AGENT", help="its name or id")

    desktop = group("desktop", "List, drain and resume the desktops that run the work.", "mission-control desktop list")
    action(desktop, "list", desktop_list, "list desktops", "mission-control desktop list")
    for name, fn, does in (("drain", desktop_drain, "drain a desktop: it takes no new run and finishes its own (admin)"),
                           ("resume", desktop_resume, "resume a drained desktop (admin)")):
        sub = action(desktop, name, fn, does, f"mission-control desktop {name} local")
        sub.add_argument("desktop", metavar="NAME")

    sub = commands.add_parser("overview", help="The counts, the resources and the log's head.",
                              description="The counts, the resources and the log's head.",
                              epilog="Example: mission-control overview --json", parents=[common])
    sub.set_defaults(fn=_run(overview))

    sub = commands.add_parser(
        "tail", parents=[common], help="Follow the activity stream; --resume FILE picks up exactly where it left off.",
        description="Follow the activity stream, from now (or --from N, or FILE's saved position with --resume), "
                    "across dropped connections and server restarts: no event lost, none twice.",
        epilog="Example: mission-control tail --types task. --resume ~/.mc-position --json --until-idle 5")
    sub.set_defaults(fn=_run(tail))
    sub.add_argument("--types", help="a comma list of event types; a trailing . or * matches a prefix (task.)")
    sub.add_argument("--task", metavar="ID", help="only this task's events")
    start = sub.add_mutually_exclusive_group()
    start.add_argument("--from", dest="from_", type=int, metavar="N", help="start after log position N (0: all)")
    start.add_argument("--resume", metavar="FILE",
                       help="start after the position saved in FILE (0 when it does not exist yet), and save each "
                            "event's position there")
    sub.add_argument("--until-idle", type=float, metavar="SECONDS",
                     help="end after SECONDS without an event")
