"""The runner with real subprocesses (the `shell` agent) on a real server: output as written,
exit codes, timeouts, cancellation down to grandchildren, retries, the concurrency limit,
prompt composition, recovery after the server is SIGKILLed, and flat memory under 50 MB of output."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime

import httpx
import psutil
import pytest

from projections.tasks import Task
from service.work.reports import compose_prompt
from tests.api_helpers import refused, wait_for

ENDED = ("review", "done", "failed", "cancelled")
KILL_GRACE_SECONDS = 1.0  # a process agent's default killGraceSeconds: SIGTERM to SIGKILL at the latest


# --- helpers shared by the runner and agent tests --------------------------------------


def register(client: httpx.Client, kind: str, **config) -> str:
    response = client.post("/agents", json={"name": f"{kind}-agent", "kind": kind, "config": config})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def start(client: httpx.Client, agent_id: str | None, content: str, type_: str = "command", **fields) -> dict:
    """Create a task and run it; the task as `run` answered."""
    created = client.post("/tasks", json={"type": type_, "content": content, **fields})
    assert created.status_code == 201, created.text
    body = {"agentId": agent_id} if agent_id else None
    started = client.post(f"/tasks/{created.json()['id']}/run", json=body)
    assert started.status_code == 200, started.text
    return started.json()


def task(client: httpx.Client, task_id: str) -> dict:
    response = client.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return response.json()


def until_status(client: httpx.Client, task_id: str, statuses=ENDED, timeout: float = 20) -> dict:
    return wait_for(
        lambda: (found := task(client, task_id))["status"] in statuses and found, timeout, f"{task_id} in {statuses}",
    )


def events(client: httpx.Client, task_id: str, type_: str | None = None) -> list[dict]:
    response = client.get(f"/tasks/{task_id}/events", params={"limit": 5000})
    assert response.status_code == 200, response.text
    return [e for e in response.json() if type_ is None or e["type"] == type_]


def output(client: httpx.Client, task_id: str, stream: str | None = None) -> str:
    """What the run wrote, from its task.output events (one stream, or all in order)."""
    chunks = events(client, task_id, "task.output")
    assert [c["payload"]["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
    return "".join(c["payload"]["chunk"] for c in chunks if stream in (None, c["payload"]["stream"]))


def failure(client: httpx.Client, task_id: str) -> dict:
    (failed,) = events(client, task_id, "task.failed")
    return failed["payload"]


def first_line_pid(client: httpx.Client, task_id: str) -> int:
    """The pid a command printed first (`sleep 60 & echo $!`)."""
    text = wait_for(lambda: (out := output(client, task_id, "stdout")).endswith("\n") and out, what="a pid")
    return int(text.split()[0])


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def api(shared_server):
    return shared_server.client()


@pytest.fixture(scope="module")
def shell(api):
    return register(api, "shell")


# --- output ------------------------------------------------------------------------------


def test_output_is_recorded_as_written_per_stream_in_order(api, shell):
    # A character split across two writes, invalid UTF-8, and stdout/stderr apart.
    script = (
        r"printf 'caf\303'; sleep 0.2; printf '\251\n'; printf 'bad \377\376 end\n'; "
        r"printf 'to stderr\n' >&2; seq 1 30000; printf 'no newline at the end'"
    )
    started = start(api, shell, script)
    done = until_status(api, started["id"])
    numbers = "".join(f"{n}\n" for n in range(1, 30001))
    stdout = "café\nbad \ufffd\ufffd end\n" + numbers + "no newline at the end"
    assert done["status"] == "done", done
    assert output(api, started["id"], "stdout") == stdout
    assert output(api, started["id"], "stderr") == "to stderr\n"
    assert done["result"] == stdout[-64 * 1024 :]  # the deliverable: stdout's tail, bounded

    whole = api.get(f"/tasks/{started['id']}/output")
    assert whole.status_code == 200 and whole.text == output(api, started["id"])
    chunks = events(api, started["id"], "task.output")
    assert all(len(c["payload"]["chunk"].encode()) <= 16 * 1024 for c in chunks)
    assert len(chunks) < 30  # ~200 KB in coalesced events, not one per write or line


def test_non_zero_exit_fails_the_run_with_its_code(api, shell):
    started = start(api, shell, "echo partial; echo oops >&2; exit 7")
    failed = until_status(api, started["id"])
    assert failed["status"] == "failed"
    assert failed["result"] == "partial\n"
    reason = failure(api, started["id"])
    assert (reason["reason"], reason["exitCode"]) == ("exit", 7)
    assert "7" in reason["error"]


def test_each_run_gets_a_minimal_environment_and_its_own_directory(api, shell, shared_server):
    # PYTEST_CURRENT_TEST is in the server's environment (it inherits this process's): not in the run's.
    started = start(api, shell, 'pwd; echo "$HOME|$PATH|$MC_TASK_ID|${PYTEST_CURRENT_TEST-unset}"; env | wc -l')
    done = until_status(api, started["id"])
    workdir, variables, count = done["result"].splitlines()
    assert workdir == str((shared_server.data_dir / "runs" / done["runId"]).resolve())  # one per run
    assert variables == f"{workdir}|/usr/local/bin:/usr/bin:/bin|{started['id']}|unset"
    assert int(count) <= 6  # PATH HOME MC_TASK_ID MC_RUN_ID, and what sh itself sets (PWD, SHLVL)


def test_allowlisted_variables_pass_through(api):
    agent = register(api, "shell", env=["LANG", "NOT_SET_ANYWHERE"])
    started = start(api, agent, 'echo "${LANG-none}|${NOT_SET_ANYWHERE-none}"')
    assert until_status(api, started["id"])["result"] == f"{os.environ.get('LANG', 'none')}|none\n"


# --- timeouts and cancellation ----------------------------------------------------------------


def test_timeout_fails_the_run_and_kills_its_process_group(api, shell):
    started = start(api, shell, "sleep 60 & echo $!; wait", timeoutSeconds=1)
    grandchild = first_line_pid(api, started["id"])
    failed = until_status(api, started["id"], timeout=10)
    assert failed["status"] == "failed"
    assert failure(api, started["id"])["reason"] == "timeout"
    wait_for(lambda: gone(grandchild), 5, "the sleep to be killed")


def test_cancel_stops_the_run_and_its_grandchildren_within_two_seconds(api, shell):
    # One grandchild dies of SIGTERM; the other ignores it and must get SIGKILL after the grace.
    started = start(api, shell, "sleep 60 & (trap '' TERM; exec sleep 61) & echo $!; wait")
    stubborn = first_line_pid(api, started["id"])
    children = psutil.Process(stubborn).parent().children()
    polite = next(p.pid for p in children if p.pid != stubborn)
    assert not gone(polite) and not gone(stubborn)

    cancelled = api.post(f"/tasks/{started['id']}/cancel", json={"reason": "enough"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # SIGTERM at once, SIGKILL once the leader exits or killGraceSeconds (1 s) later: a second to spare.
    wait_for(lambda: gone(polite) and gone(stubborn), KILL_GRACE_SECONDS + 1, "both grandchildren to be gone")
    assert events(api, started["id"])[-1]["type"] == "task.cancelled"  # nothing recorded after it


def left_the_group(client: httpx.Client, task_id: str) -> int:
    """The pid a `setsid ... & echo $!` printed, once it runs in a session of its own."""
    pid = first_line_pid(client, task_id)
    wait_for(lambda: psutil.Process(pid).name() == "sleep", what="setsid to exec sleep")
    assert os.getsid(pid) == pid  # out of the run's process group: killpg does not reach it
    return pid


def test_a_grandchild_that_leaves_the_group_does_not_survive_cancel_timeout_or_the_run_s_end(api, shell):
    cancelled = start(api, shell, "setsid sleep 311 & echo $!; wait")
    escaped = left_the_group(api, cancelled["id"])
    assert api.post(f"/tasks/{cancelled['id']}/cancel").status_code == 200
    wait_for(lambda: gone(escaped), 5, "the setsid sleep to be killed at cancel")

    timed_out = start(api, shell, "setsid sleep 312 & echo $!; wait", timeoutSeconds=1)
    escaped = left_the_group(api, timed_out["id"])
    assert failure(api, until_status(api, timed_out["id"])["id"])["reason"] == "timeout"
    wait_for(lambda: gone(escaped), 5, "the setsid sleep to be killed at the timeout")

    # The leader exits at once; its orphan (holding stdout) ends with the run, which ends.
    ended = start(api, shell, "setsid sleep 314 & echo $!")
    escaped = first_line_pid(api, ended["id"])
    assert until_status(api, ended["id"])["status"] == "done"
    wait_for(lambda: gone(escaped), 5, "the orphaned sleep to be killed at the run's end")


def test_a_replayed_cancel_leaves_the_next_run_alone(api):
    """A client retrying its cancel (same Idempotency-Key) after the task was retried and run
    again gets the first answer back; the new run must neither be stopped nor left unended."""
    slow = {"echo": {"delayMs": 1500, "chunks": 3}}
    first = start(api, None, "slow", type_="prompt", metadata=slow)
    cancel = {"Idempotency-Key": f"cancel-{first['id']}"}
    assert api.post(f"/tasks/{first['id']}/cancel", headers=cancel).json()["status"] == "cancelled"
    assert api.post(f"/tasks/{first['id']}/retry").status_code == 200
    again = api.post(f"/tasks/{first['id']}/run").json()
    replay = api.post(f"/tasks/{first['id']}/cancel", headers=cancel)
    assert replay.status_code == 200 and replay.json()["status"] == "cancelled"  # the first answer
    done = until_status(api, first["id"])
    assert (done["status"], done["runId"]) == ("done", again["runId"])


def test_retry_is_a_new_run_and_history_keeps_both(api, shell):
    # The second run finds what was staged for it after the first (each run has a directory of its own).
    started = start(api, shell, "test -f inputs/go || { echo first; exit 1; }; echo second")
    assert until_status(api, started["id"])["status"] == "failed"
    first_run = events(api, started["id"], "task.started")[0]["payload"]["runId"]

    assert api.post(f"/tasks/{started['id']}/retry").json()["status"] == "pending"
    assert api.put(f"/tasks/{started['id']}/artifacts/go", content=b"1").status_code == 201
    again = api.post(f"/tasks/{started['id']}/run", json={"agentId": shell})
    assert again.status_code == 200
    done = until_status(api, started["id"])
    assert (done["status"], done["runs"], done["result"]) == ("done", 2, "second\n")
    runs = [e["payload"]["runId"] for e in events(api, started["id"], "task.started")]
    assert len(set(runs)) == 2 and runs[0] == first_run
    assert api.get(f"/tasks/{started['id']}/output", params={"runId": first_run}).text == "first\n"
    assert api.get(f"/tasks/{started['id']}/output").text == "second\n"


# --- admission ----------------------------------------------------------------------------------


def test_the_concurrency_limit_counts_running_and_awaiting_input(make_server):
    s = make_server(MC_MAX_CONCURRENT=2)
    client = s.client()
    shell = register(client, "shell")
    asking = start(client, None, "question time", "prompt", metadata={"echo": {"ask": "Which colour?"}})
    until_status(client, asking["id"], ("awaiting_input",))
    sleeping = start(client, shell, "sleep 60")

    third = client.post("/tasks", json={"type": "command", "content": "echo third"}).json()
    refused_run = client.post(f"/tasks/{third['id']}/run", json={"agentId": shell})
    refused(refused_run, 429, "concurrency_limit")
    assert refused_run.headers["Retry-After"]

    assert client.post(f"/tasks/{sleeping['id']}/cancel").status_code == 200
    assert client.post(f"/tasks/{third['id']}/run", json={"agentId": shell}).status_code == 200
    assert until_status(client, third["id"])["result"] == "third\n"
    assert client.post(f"/tasks/{asking['id']}/messages", json={"message": "blue"}).status_code == 202
    assert until_status(client, asking["id"])["result"].endswith("\nblue")


# --- prompts --------------------------------------------------------------------------------------


def _task(**fields) -> Task:
    return Task(id="t", type="prompt", project_id="p", created_by="u", created_at="now", **fields)


def test_compose_prompt_orders_context_dependencies_then_the_task():
    deps = [_task(content="a", result="result A"), _task(content="b"), _task(content="c", result="result C")]
    me = _task(title="Title", description="Description", content="Content")
    assert compose_prompt("Context", deps, me) == "Context\n\nresult A\n\nresult C\n\nTitle\n\nDescription\n\nContent"
    assert compose_prompt(None, [], _task(content="only")) == "only"


def test_a_run_receives_context_then_dependency_results_then_its_own_text(api):
    project = api.post("/projects", json={"name": "composition", "context": "We write haiku."})
    assert project.status_code == 201, project.text
    project_id = project.json()["id"]
    first = start(api, None, "first draft", "prompt", projectId=project_id)
    second = api.post("/tasks", json={"type": "prompt", "content": "second draft", "projectId": project_id}).json()
    final = api.post("/tasks", json={
        "type": "prompt", "content": "Merge them.", "title": "Merge", "description": "Keep it short.",
        "projectId": project_id, "dependsOn": [first["id"], second["id"]],
    }).json()
    until_status(api, first["id"])
    refused(api.post(f"/tasks/{final['id']}/run"), 409, "dependency_not_done")

    api.post(f"/tasks/{second['id']}/run")
    results = [until_status(api, t["id"])["result"] for t in (first, second)]
    assert results == ["We write haiku.\n\nfirst draft", "We write haiku.\n\nsecond draft"]
    assert api.post(f"/tasks/{final['id']}/run").status_code == 200
    expected = "\n\n".join(["We write haiku.", *results, "Merge", "Keep it short.", "Merge them."])
    assert until_status(api, final["id"])["result"] == expected  # echo answers with its prompt


# --- recovery ------------------------------------------------------------------------------------


def test_a_run_interrupted_by_sigkill_fails_as_interrupted_at_the_next_start(make_server):
    first = make_server()
    client = first.client()
    shell = register(client, "shell")
    started = start(client, shell, "sleep 60 & echo $!; wait")
    orphan = first_line_pid(client, started["id"])
    first.kill()
    assert not gone(orphan)  # the dead server's run left its process behind

    second = make_server(first.data_dir)
    client = second.client()
    failed = task(client, started["id"])  # the first answer of the new process already has it
    assert failed["status"] == "failed"
    interrupted = events(client, started["id"], "task.failed")[0]
    assert interrupted["payload"]["reason"] == "interrupted"
    wait_for(lambda: gone(orphan), 5, "the orphaned sleep to be killed")

    after = start(client, shell, "echo alive")
    assert until_status(client, after["id"])["result"] == "alive\n"
    assert events(client, after["id"])[0]["position"] > interrupted["position"]


def test_a_grandchild_without_the_run_s_environment_outside_its_group_is_killed_after_sigkill(make_server):
    first = make_server()
    client = first.client()
    started = start(client, register(client, "shell"), "env -i setsid sleep 313 & echo $!; wait")
    escaped = left_the_group(client, started["id"])
    assert "MC_RUN_ID" not in psutil.Process(escaped).environ()
    # Recorded as it appeared, where the next start finds it (a kill within the first poll would be too soon).
    record = first.data_dir / "runs" / f"{started['runId']}.pids"
    wait_for(lambda: record.exists() and str(escaped) in record.read_text().split(), what="the sleep on record")
    first.kill()
    assert not gone(escaped)

    client = make_server(first.data_dir).client()
    assert task(client, started["id"])["status"] == "failed"
    wait_for(lambda: gone(escaped), 5, "the escaped sleep to be killed by the recovery")


def test_a_graceful_stop_kills_running_processes_and_records_the_runs_as_interrupted(make_server):
    first = make_server()
    client = first.client()
    started = start(client, register(client, "shell"), "sleep 60 & echo $!; wait")
    grandchild = first_line_pid(client, started["id"])
    assert first.stop() == 0  # SIGTERM: the service shuts down in order
    stopped_at = datetime.now(UTC)
    assert gone(grandchild)
    client = make_server(first.data_dir).client()
    assert task(client, started["id"])["status"] == "failed"
    (failed,) = events(client, started["id"], "task.failed")
    assert failed["payload"]["reason"] == "interrupted"
    assert datetime.fromisoformat(failed["recordedAt"].replace("Z", "+00:00")) < stopped_at  # not left to recovery


# --- memory ---------------------------------------------------------------------------------------


def test_a_run_printing_50_mb_keeps_server_memory_flat(make_server):
    s = make_server()
    client = s.client()
    shell = register(client, "shell")
    server = psutil.Process(s.process.pid)
    baseline = server.memory_info().rss

    def peak_rss_while_printing(size: int) -> tuple[int, str]:
        peak, running = [0], threading.Event()
        running.set()

        def sample() -> None:
            while running.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            started = start(client, shell, f"head -c {size} /dev/zero | tr '\\0' x")
            assert until_status(client, started["id"], timeout=120)["status"] == "done"
        finally:
            running.clear()
            sampler.join()
        return peak[0], started["id"]

    mib = 1024 * 1024
    small, _ = peak_rss_while_printing(25 * mib)
    big, task_id = peak_rss_while_printing(50 * mib)
    # Memory is bounded (the log keeps ~8-16 MiB of recent events at hand for live readers) and
    # does not grow with the output: twice as much of it, next to nothing more.
    assert big - baseline < 45 * mib, f"the server grew by {(big - baseline) / mib:.1f} MiB"
    assert big - small < 8 * mib, f"50 MB took {(big - small) / mib:.1f} MiB more than 25 MB"
    received = 0
    with client.stream("GET", f"/tasks/{task_id}/output") as response:
        for chunk in response.iter_bytes():
            assert chunk.count(b"x") == len(chunk)
            received += len(chunk)
    assert received == 50 * mib
