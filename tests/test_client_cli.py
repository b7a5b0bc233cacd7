"""`mission-control task|approval|agent|desktop|overview|tail` as a user runs them: real processes
against a real server on loopback (issue 20). The commands are built on service/client, so these
exercise the client too; the last tests use the library directly, sync and async."""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import time

import msgspec
import pytest

from events import RecordedEvent
from projections.tasks import Task
from service.api.schemas import Overview
from service.cli import parser
from service.client import ApiError, AsyncClient, Client, RunWatch
from tests.server import free_port

ERROR = 4
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def mc(server, *args: str, token: str | None = None, input: str | None = None, env: dict[str, str] | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess:
    """`mission-control ARGS` against `server` with its admin key (or `token`) in the environment."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MC_")}
    environment |= {"MC_SERVER": server.base_url, "MC_TOKEN": server.admin_token if token is None else token}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          input=input if input is not None else "", env={**environment, **(env or {})},
                          timeout=timeout)


def ok(server, *args: str, **options) -> subprocess.CompletedProcess:
    ran = mc(server, *args, **options)
    assert ran.returncode == 0, (args, ran.stdout, ran.stderr)
    return ran


def decoded(ran: subprocess.CompletedProcess, kind):
    return msgspec.json.decode(ran.stdout, type=kind)


def create(server, content: str, *options: str, **kw) -> Task:
    return decoded(ok(server, "task", "create", "--type", "prompt", "--content", content, *options, "--json", **kw),
                   Task)


def refused(ran: subprocess.CompletedProcess, *fragments: str) -> str:
    """An error: one sentence on stderr, no traceback, exit 4."""
    assert ran.returncode == ERROR, (ran.returncode, ran.stdout, ran.stderr)
    line = ran.stderr.strip()
    assert line.startswith("mission-control: ") and "\n" not in line and "Traceback" not in line, ran.stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


def wait_for(check, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def status_of(server, task_id: str) -> str:
    return server.client().get(f"/tasks/{task_id}").json()["status"]


# --- tasks ----------------------------------------------------------------------------------------


def test_create_takes_every_field_and_show_list_agree(shared_server, tmp_path):
    first = create(shared_server, "Say hello", "--title", "Hello", "--description", "greeting", "--priority", "8",
                   "--metadata", '{"team": "apollo"}', "--requires-approval", "--timeout", "60",
                   "--idempotency-key", "cli-hello-1", "--desktop", "local")
    assert (first.title, first.description, first.priority, first.metadata, first.requires_approval,
            first.timeout_seconds, first.desktop_id, first.status) == (
        "Hello", "greeting", 8, {"team": "apollo"}, True, 60, "local", "pending")
    again = create(shared_server, "Say hello", "--title", "Hello", "--description", "greeting", "--priority", "8",
                   "--metadata", '{"team": "apollo"}', "--requires-approval", "--timeout", "60",
                   "--idempotency-key", "cli-hello-1", "--desktop", "local")
    assert again.id == first.id and again.version == first.version  # the same key and body: nothing twice

    shown = decoded(ok(shared_server, "task", "show", first.id, "--json"), Task)
    assert shown == first
    table = ok(shared_server, "task", "show", first.id).stdout
    assert first.id in table and "Hello" in table and "pending" in table

    dependent = create(shared_server, "Use it", "--depends-on", first.id)
    assert dependent.depends_on == [first.id]
    listed = decoded(ok(shared_server, "task", "list", "--search", "Say hello", "--status", "pending", "--json"),
                     list[Task])
    assert [t.id for t in listed] == [first.id]
    table = ok(shared_server, "task", "list", "--search", "Say hello").stdout.splitlines()
    assert table[0].split() == ["ID", "STATUS", "TYPE", "PRIORITY", "RUNS", "TITLE", "CREATED"]
    assert table[1].split()[:5] == [first.id, "pending", "prompt", "8", "0"]

    content = tmp_path / "brief.txt"
    content.write_text("From a file\n")
    from_file = decoded(ok(shared_server, "task", "create", "--type", "prompt", "--file", str(content), "--json"), Task)
    assert from_file.content == "From a file\n"
    from_stdin = decoded(ok(shared_server, "task", "create", "--type", "command", "--file", "-", "--json",
                            input="echo piped"), Task)
    assert (from_stdin.type, from_stdin.content) == ("command", "echo piped")


def test_run_follow_streams_the_output_answers_from_stdin_and_exits_0(shared_server):
    task = create(shared_server, "Plan the trip", "--metadata", '{"echo": {"ask": "Which planet?", "chunks": 4}}')
    ran = mc(shared_server, "task", "run", task.id, "--follow", input="Mars\n")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "Plan the trip\nMars"  # the output as the agent wrote it, nothing else on stdout
    assert f"task {task.id} done" in ran.stderr

    assert ok(shared_server, "task", "output", task.id).stdout == "Plan the trip\nMars"
    runs = json.loads(ok(shared_server, "task", "runs", task.id, "--json").stdout)
    assert [(r["number"], r["status"], r["desktopId"]) for r in runs] == [(1, "done", "local")]
    as_json = json.loads(ok(shared_server, "task", "output", task.id, "--run", runs[0]["runId"], "--json").stdout)
    assert as_json["output"] == "Plan the trip\nMars"
    table = ok(shared_server, "task", "runs", task.id).stdout
    assert runs[0]["runId"] in table and "done" in table


EXEC_AGENT = textwrap.dedent("""\
    import sys
    print("prompt:", sys.stdin.readline().strip(), flush=True)
    print("@@mc:input Your name?", flush=True)
    name = sys.stdin.readline().strip()
    print("@@mc:input Your planet?", flush=True)
    print("hello", name, "of", sys.stdin.readline().strip(), flush=True)
""")


def test_follow_answers_each_question_of_an_exec_agent_in_turn(shared_server, tmp_path):
    program = tmp_path / "asks-twice.py"
    program.write_text(EXEC_AGENT)
    agent = json.loads(ok(shared_server, "agent", "create", "--name", "asks-twice", "--kind", "exec", "--config",
                          json.dumps({"argv": [sys.executable, str(program)]}), "--json").stdout)
    task = create(shared_server, "Greet me", "--agent", "asks-twice")
    assert task.agent_id == agent["id"]  # --agent takes a name
    ran = mc(shared_server, "task", "run", task.id, "--follow", input="Ada\nMars\n")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "prompt: Greet me\nhello Ada of Mars\n"


def test_follow_exits_1_on_failure_and_3_in_review_then_review_and_approvals_decide(shared_server):
    failing = create(shared_server, "Break", "--metadata", '{"echo": {"fail": "the agent gave up"}}')
    ran = mc(shared_server, "task", "run", failing.id, "--follow")
    assert ran.returncode == 1 and "the agent gave up" in ran.stderr, ran.stderr
    retried = decoded(ok(shared_server, "task", "retry", failing.id, "--json"), Task)
    assert (retried.status, retried.runs) == ("pending", 1)

    reviewed = create(shared_server, "Write the launch note", "--requires-approval")
    ran = mc(shared_server, "task", "run", reviewed.id, "--follow")
    assert ran.returncode == 3 and "in review" in ran.stderr, ran.stderr
    rejected = decoded(ok(shared_server, "task", "review", reviewed.id, "reject", "--feedback", "Too short",
                          "--json"), Task)
    assert (rejected.status, rejected.error) == ("failed", "rejected: Too short")

    other = create(shared_server, "Write the release note", "--requires-approval")
    assert mc(shared_server, "task", "run", other.id, "--follow").returncode == 3
    pending = json.loads(ok(shared_server, "approval", "list", "--json").stdout)
    mine = [a for a in pending if a["taskId"] == other.id]
    assert [a["status"] for a in mine] == ["pending"]
    assert mine[0]["id"] in ok(shared_server, "approval", "list").stdout
    resolved = json.loads(ok(shared_server, "approval", "resolve", mine[0]["id"], "approve", "--feedback", "Ship it",
                             "--json").stdout)
    assert (resolved["status"], resolved["feedback"]) == ("approved", "Ship it")
    assert status_of(shared_server, other.id) == "done"
    assert mine[0]["id"] in ok(shared_server, "approval", "list", "--status", "approved").stdout


def test_follow_exits_2_when_the_run_is_cancelled(shared_server):
    slow = create(shared_server, "Take your time", "--metadata", '{"echo": {"delayMs": 60000}}')
    following = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "task", "run", slow.id, "--follow"], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MC_SERVER": shared_server.base_url, "MC_TOKEN": shared_server.admin_token},
    )
    try:
        wait_for(lambda: status_of(shared_server, slow.id) == "running", "the run to start")
        cancelled = decoded(ok(shared_server, "task", "cancel", slow.id, "--reason", "changed my mind", "--json"), Task)
        assert (cancelled.status, cancelled.error) == ("cancelled", "cancelled: changed my mind")
        out, err = following.communicate(timeout=30)
    finally:
        following.kill()
    assert following.returncode == 2, err
    assert "cancelled: changed my mind" in err


def test_follow_on_a_terminal_shows_the_status_line_and_prompts(shared_server):
    """The TTY path: rich's status line while it runs, the question as a prompt, the answer typed."""
    task = create(shared_server, "Plan the trip", "--metadata",
                  '{"echo": {"ask": "Which planet?", "delayMs": 1500, "chunks": 3}}')
    master, slave = pty.openpty()
    env = {**os.environ, "MC_SERVER": shared_server.base_url, "MC_TOKEN": shared_server.admin_token,
           "TERM": "xterm-256color", "COLUMNS": "120"}
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "task", "run", task.id, "--follow"],
                               stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    screen, answered = b"", False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the other side closed: the command ended
                    break
                screen += data
                if not answered and b"Which planet?" in screen:
                    os.write(master, b"Mars\r")
                    answered = True
            elif process.poll() is not None:
                break
        code = process.wait(timeout=30)
    finally:
        process.kill()
        os.close(master)
    text = ANSI.sub("", screen.decode(errors="replace"))
    assert code == 0, text
    assert answered and "? Which planet? Mars" in text
    assert "awaiting_input" in text and "running" in text  # the status line, as it changed
    assert "Plan the trip" in text and f"task {task.id} done" in text


def test_queue_waits_for_a_desktop_and_the_list_shows_the_queue_in_order(shared_server):
    """`--queue` on a run whose desktop is not online answers it queued, with its position, and
    `task list --sort queue` shows the queue in the order it will start."""
    first = create(shared_server, "Queue me", "--desktop", "nowhere-yet")
    second = create(shared_server, "Queue me first", "--desktop", "nowhere-yet", "--priority", "9")
    ran = mc(shared_server, "task", "run", first.id, "--queue", "--queue-timeout", "3600", "--json")
    assert ran.returncode == 0, ran.stderr
    assert (decoded(ran, Task).status, decoded(ran, Task).queue_position) == ("queued", 1)
    assert mc(shared_server, "task", "run", second.id, "--queue", "--json").returncode == 0
    listed = mc(shared_server, "task", "list", "--status", "queued", "--sort", "queue", "--json")
    assert [task["id"] for task in json.loads(listed.stdout)] == [second.id, first.id]
    refused_run = mc(shared_server, "task", "run", create(shared_server, "No queue", "--desktop", "nowhere-yet").id)
    assert refused_run.returncode == 4 and "nowhere-yet" in refused_run.stderr  # without --queue: refused, a sentence
    for task in (first, second):
        assert mc(shared_server, "task", "cancel", task.id).returncode == 0


# --- agents, desktops, the overview --------------------------------------------------------------


def test_agents_desktops_and_the_overview(shared_server):
    agents = json.loads(ok(shared_server, "agent", "list", "--json").stdout)
    assert "echo" in [a["name"] for a in agents]
    assert "echo" in ok(shared_server, "agent", "list").stdout
    shell = json.loads(ok(shared_server, "agent", "create", "--name", "cli-sh", "--kind", "shell", "--json").stdout)
    assert json.loads(ok(shared_server, "agent", "pause", "cli-sh", "--json").stdout)["status"] == "paused"
    command = decoded(ok(shared_server, "task", "create", "--type", "command", "--content", "echo hi", "--json"), Task)
    refused(mc(shared_server, "task", "run", command.id, "--agent", shell["id"]), "paused")
    assert "active" in ok(shared_server, "agent", "resume", shell["id"]).stdout
    assert mc(shared_server, "task", "run", command.id, "--agent", "cli-sh", "--follow").stdout == "hi\n"
    refused(mc(shared_server, "agent", "pause", "no-such-agent"), "No agent is named 'no-such-agent'")

    desktops = json.loads(ok(shared_server, "desktop", "list", "--json").stdout)
    assert [(d["id"], d["status"]) for d in desktops] == [("local", "online")]
    assert json.loads(ok(shared_server, "desktop", "drain", "local", "--json").stdout)["status"] == "draining"
    assert "online" in ok(shared_server, "desktop", "resume", "local").stdout
    assert re.search(r"^local\s+online\s", ok(shared_server, "desktop", "list").stdout, re.M)

    overview = decoded(ok(shared_server, "overview", "--json"), Overview)
    assert overview.active_desktops == 1 and overview.log.head > 0
    assert re.search(r"^log\s+head \d+, \d+ streams$", ok(shared_server, "overview").stdout, re.M)


# --- errors ---------------------------------------------------------------------------------------


def test_every_error_is_a_sentence_and_exit_4(shared_server, tmp_path):
    reader = shared_server.token("cli-reader", "task:read")
    task = create(shared_server, "Look, do not touch")
    refused(mc(shared_server, "task", "show", task.id, token="mc_not-a-key"), "not known")
    refused(mc(shared_server, "task", "show", "6b1f3c2e-0000-4000-8000-000000000000"), "not found")
    refused(mc(shared_server, "task", "show", "nope"), "not a valid UUID")
    refused(mc(shared_server, "task", "create", "--type", "prompt", "--content", "x", token=reader), "task:write")
    refused(mc(shared_server, "desktop", "drain", "local", token=reader), "admin")
    refused(mc(shared_server, "task", "show", task.id, token=reader), "not found")  # another user's, never leaked
    assert ok(shared_server, "task", "list", token=reader)  # reading is its scope
    refused(mc(shared_server, "task", "retry", task.id), "pending")  # a task not in the status it needs
    refused(mc(shared_server, "task", "create", "--type", "prompt", "--content", "x", "--metadata", "{not json"),
            "--metadata is not JSON")
    refused(mc(shared_server, "task", "create", "--type", "prompt"), "--content TEXT or --file PATH")

    down = mc(shared_server, "overview", env={"MC_SERVER": f"http://127.0.0.1:{free_port()}"})
    refused(down, "Cannot reach the server", "mission-control serve")
    refused(mc(shared_server, "overview", token=""), "no API key")

    key = tmp_path / "token"
    key.write_text(shared_server.admin_token + "\n")
    key.chmod(0o644)
    refused(mc(shared_server, "overview", "--token-file", str(key), token=""), "may be read by others", "chmod 600")
    key.chmod(0o600)
    assert decoded(ok(shared_server, "overview", "--token-file", str(key), "--json", token=""), Overview)
    assert ok(shared_server, "overview", token="", env={"MC_TOKEN_FILE": str(key)})


def test_every_client_command_has_help_with_an_example():
    def leaves(sub: argparse.ArgumentParser, path: tuple[str, ...]):
        actions = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            yield path, sub
        for action in actions:
            for name, child in action.choices.items():
                yield from leaves(child, (*path, name))

    found = {path: sub for path, sub in leaves(parser(), ())}
    client = [p for p in found if p[0] in ("task", "approval", "agent", "desktop", "overview", "tail")]
    assert len(client) == 21, sorted(client)
    for path in client:
        text = found[path].format_help()
        assert f"Example: mission-control {' '.join(path)}" in text, (path, text)


# --- tail ------------------------------------------------------------------------------------------


def positions(text: str) -> list[int]:
    return [msgspec.json.decode(line, type=RecordedEvent).position for line in text.splitlines()]


def test_tail_prints_events_as_ndjson_or_lines_with_its_filters(shared_server):
    task = create(shared_server, "Tail me")
    ran = ok(shared_server, "tail", "--from", "0", "--json", "--until-idle", "2")
    seen = positions(ran.stdout)
    assert seen == list(range(1, len(seen) + 1)) and len(seen) >= 3  # the admin sees every event, in order
    only = [msgspec.json.decode(line) for line in
            ok(shared_server, "tail", "--from", "0", "--task", task.id, "--types", "task.", "--json", "--until-idle",
               "2").stdout.splitlines()]
    assert [(e["type"], e["payload"]["taskId"]) for e in only] == [("task.created", task.id)]
    lines = ok(shared_server, "tail", "--from", "0", "--task", task.id, "--until-idle", "2").stdout
    assert re.search(rf"^\s*\d+\s+\S+Z\s+task\.created\s+task-{task.id}\s+\{{", lines, re.M), lines
    assert ok(shared_server, "tail", "--until-idle", "2", "--json").stdout == ""  # from now: nothing new


def test_tail_resume_across_a_server_restart_loses_nothing_and_repeats_nothing(server, tmp_path):
    saved = tmp_path / "position"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MC_")},
           "MC_SERVER": server.base_url, "MC_TOKEN": server.admin_token}
    first = subprocess.Popen([sys.executable, "-m", "service.cli", "tail", "--resume", str(saved), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        def head() -> int:
            return server.client().get("/overview").json()["log"]["head"]

        def caught_up() -> bool:
            return saved.exists() and saved.read_text().strip() == str(head())

        for n in range(3):
            create(server, f"before the restart {n}")
        wait_for(caught_up, "the tail to save the head's position")
        server.restart()
        for n in range(3):
            create(server, f"after the restart {n}")
        wait_for(caught_up, "the tail to reconnect and reach the new head")
        first.send_signal(signal.SIGINT)  # the command stopped while it waits: restarted below from FILE
        out, err = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 130, err
    for n in range(2):
        create(server, f"while no tail runs {n}")
    second = ok(server, "tail", "--resume", str(saved), "--json", "--until-idle", "2")
    seen = positions(out) + positions(second.stdout)
    assert seen == list(range(1, head() + 1))  # every event once, in order, across both
    assert saved.read_text().strip() == str(head())


# --- the concurrency limit ---------------------------------------------------------------------------


def test_a_run_at_the_concurrency_limit_waits_out_retry_after_then_starts(make_server, tmp_path):
    server = make_server(MC_MAX_CONCURRENT=1)
    busy = create(server, "Hold the slot", "--metadata", '{"echo": {"delayMs": 600000}}')
    ok(server, "task", "run", busy.id)
    waiting = create(server, "Wait for the slot")
    refused(mc(server, "task", "run", waiting.id, "--patience", "0"), "Maximum concurrent tasks (1) reached")

    told = tmp_path / "stderr"
    with told.open("w") as stderr:
        following = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "task", "run", waiting.id, "--follow"], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, "MC_SERVER": server.base_url, "MC_TOKEN": server.admin_token},
        )
        try:
            wait_for(lambda: "Trying again" in told.read_text(), "the client to wait out a 429")
            ok(server, "task", "cancel", busy.id)  # the slot frees while it waits
            out, _ = following.communicate(timeout=60)
        finally:
            following.kill()
    assert following.returncode == 0, told.read_text()
    # The server's sentence, and its Retry-After honoured.
    assert "Maximum concurrent tasks (1) reached. Trying again in 5 s." in told.read_text()
    assert out == "Wait for the slot"


# --- the library ------------------------------------------------------------------------------------


def test_the_sync_client_decodes_the_servers_models_and_tells_of_each_429(make_server):
    server = make_server(MC_MAX_CONCURRENT=1)
    told: list[tuple[str, float]] = []
    admin = server.client()

    def retrying(error: ApiError, wait: float) -> None:
        told.append((error.code, wait))
        assert admin.post(f"/tasks/{busy.id}/cancel").status_code == 200  # the slot frees while it waits

    with Client(server.base_url + "/api/mission-control", server.admin_token, on_retry=retrying) as client:
        busy = client.create_task("prompt", "Hold", metadata={"echo": {"delayMs": 600000}})
        assert isinstance(busy, Task) and client.run_task(busy.id).status == "running"
        second = client.create_task("prompt", "Next")
        started = client.run_task(second.id)  # waits out the limit
        assert started.status == "running" and told == [("concurrency_limit", 5.0)]
        watch = RunWatch(started.run_id)
        for event in client.stream(started.created_position - 1, task_id=second.id):
            watch.see(event)
            if watch.exit_code is not None:
                break
        assert watch.exit_code == 0 and client.output(second.id) == "Next"
        with pytest.raises(ApiError) as refusal:
            client.retry_task(second.id)
        assert (refusal.value.status, refusal.value.code) == (409, "invalid_status")


async def test_the_async_client_runs_and_streams_a_task(shared_server):
    async with AsyncClient(shared_server.base_url, shared_server.admin_token) as client:
        task = await client.create_task("prompt", "Async hello", metadata={"echo": {"chunks": 2}})
        started = await client.run_task(task.id)
        watch, chunks = RunWatch(started.run_id), []
        async for event in client.stream(task.created_position - 1, task_id=task.id, idle=30):
            data = watch.see(event)
            if event.type == "task.output" and data is not None:
                chunks.append(data.chunk)
            if watch.exit_code is not None:
                break
        assert watch.exit_code == 0 and "".join(chunks) == "Async hello"
        assert [run.status for run in await client.runs(task.id)] == ["done"]
        assert (await client.overview()).log.head >= watch.started.position
