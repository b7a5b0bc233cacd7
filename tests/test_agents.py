"""The `exec` and `openai` agents against real programs and a real OpenAI-compatible server on
loopback, and the rules for registering and choosing agents."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.work.agents.exec import InputLines
from tests.api_helpers import refused, wait_for
from tests.server import Server
from tests.test_runner import events, output, register, start, task, until_status

KEY_VARIABLE = "LOOPBACK_PROVIDER_API_KEY"


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    """One server for the module, with the provider's API key in its environment."""
    s = Server(tmp_path_factory.mktemp("agents") / "data", {KEY_VARIABLE: "sk-loopback"}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api(mc):
    return mc.client()


# --- exec -----------------------------------------------------------------------------------------

PROGRAM = textwrap.dedent("""\
    import sys
    prompt = sys.stdin.readline().rstrip("\\n")
    print("prompt:", prompt, flush=True)
    print("@@mc:input What is your name?", flush=True)
    name = sys.stdin.readline().rstrip("\\n")
    print("hello", name, flush=True)
    sys.stderr.write("waiting for one more line\\n")
    sys.stderr.flush()
    print("and", sys.stdin.readline().rstrip("\\n"), flush=True)
""")


def test_exec_prompt_on_stdin_input_round_trip_and_messages_while_running(api, tmp_path):
    program = tmp_path / "agent.py"
    program.write_text(PROGRAM)
    agent = register(api, "exec", argv=[sys.executable, str(program)])
    started = start(api, agent, "Say hi", "prompt")

    waiting = until_status(api, started["id"], ("awaiting_input",))
    assert waiting["inputPrompt"] == "What is your name?"
    assert events(api, started["id"], "task.input_requested")[0]["payload"]["prompt"] == "What is your name?"
    assert output(api, started["id"]) == "prompt: Say hi\n"  # the marker line is not output

    assert api.post(f"/tasks/{started['id']}/messages", json={"message": "Ada"}).status_code == 202
    wait_for(lambda: "waiting" in output(api, started["id"], "stderr"), what="the program to read again")
    assert task(api, started["id"])["status"] == "running"
    assert api.post(f"/tasks/{started['id']}/messages", json={"message": "goodbye"}).status_code == 202

    done = until_status(api, started["id"])
    assert done["status"] == "done", done
    assert done["result"] == "prompt: Say hi\nhello Ada\nand goodbye\n"
    assert output(api, started["id"], "stdout") == done["result"]
    assert output(api, started["id"], "stderr") == "waiting for one more line\n"


def test_a_run_that_ends_while_awaiting_input_fails(api, tmp_path):
    """API.md: awaiting_input goes to running (a message) or failed, never straight to done."""
    program = tmp_path / "asks-and-leaves.py"
    program.write_text('print("@@mc:input Anyone there?", flush=True)\n')
    agent = register(api, "exec", argv=[sys.executable, str(program)])
    started = start(api, agent, "Ask, then go", "prompt")
    ended = until_status(api, started["id"])
    assert ended["status"] == "failed" and "waited for input" in ended["error"]
    assert [e["type"] for e in events(api, started["id"])][-2:] == ["task.input_requested", "task.failed"]


@pytest.mark.parametrize("split", [1, 2, 5, 1000])
async def test_marker_lines_are_found_however_the_output_is_split(split):
    text = "a @@mc:input not at a line start\n@@mc:input First?\r\n@@mc:inpu no\n@@\n@@mc:input Second?\n@@mc"
    passed, asked = [], []

    async def record(question: str) -> None:
        asked.append((question, "".join(passed)))  # what had been passed on when it asked

    lines = InputLines("@@mc:input ", lambda out: _append(passed, out), record)
    for at in range(0, len(text), split):
        await lines.feed(text[at : at + split])
    await lines.close()
    before_first = "a @@mc:input not at a line start\n"
    assert asked == [("First?", before_first), ("Second?", before_first + "@@mc:inpu no\n@@\n")]
    assert "".join(passed) == before_first + "@@mc:inpu no\n@@\n@@mc"  # an unfinished marker at the end is output


async def _append(parts: list[str], text: str) -> None:
    parts.append(text)


def test_exec_program_that_cannot_start_fails_the_run(api, tmp_path):
    agent = register(api, "exec", argv=[str(tmp_path / "missing-program")])
    started = start(api, agent, "anything", "prompt")
    failed = until_status(api, started["id"])
    assert failed["status"] == "failed" and "missing-program" in failed["error"]


# --- a real OpenAI-compatible server on loopback --------------------------------------------------


class Provider(ThreadingHTTPServer):
    """POST /v1/chat/completions, behaving as the request's `model` says."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ProviderHandler)
        self.requests: list[tuple[dict, dict]] = []
        self.disconnected = threading.Event()
        self.release = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class ProviderHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Provider

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((dict(self.headers), body))
        model = body["model"]
        if model == "broken":
            return self._json(500, {"error": {"message": "the model fell over"}})
        if model == "no-stream":  # a server that ignores `stream`: one JSON answer, its usage in it
            return self._json(200, {"choices": [{"message": {"role": "assistant", "content": "Whole."}}],
                                    "usage": {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        usage = (body.get("stream_options") or {}).get("include_usage")  # as OpenAI: asked for, or none
        if model == "chat":
            turns = [m["content"] for m in body["messages"] if m["role"] == "user"]
            if len(turns) == 1:
                self._deltas(["Hel", "lo", " wor", "ld"])
                self.server.release.wait(10)  # a message may arrive meanwhile
                self._deltas([], finish=True)
            else:
                self._deltas([f"You said: {turns[-1]}"], finish=True)
            if usage:  # the final chunk: no choices, the completion's usage
                self._usage(100 * len(body["messages"]), 7)
            self._sse("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        elif model == "metered":  # the usage the request's `meter` (the agent's params) names, in the final chunk
            self._deltas(["Counted."], finish=True)
            if usage:
                self._usage(*body["meter"])
            self._sse("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        elif model == "meter-every-chunk":  # usage so far in every chunk, as some servers send it
            try:
                for n in range(1, 600):
                    self._sse(json.dumps({"choices": [{"index": 0, "delta": {"content": "word "}, "finish_reason": None}],
                                          "usage": {"prompt_tokens": 10, "completion_tokens": n}}))
                    time.sleep(0.02)
            except OSError:
                self.server.disconnected.set()
        elif model == "garbage":
            self._sse("{this is not json")
        elif model == "hangup":
            self._deltas(["partial"])
            self.connection.shutdown(socket.SHUT_RDWR)  # no terminating chunk: a dropped connection
        elif model == "slow":
            try:
                for _ in range(600):
                    self._deltas(["tick "])
                    time.sleep(0.05)
            except OSError:
                self.server.disconnected.set()
        self.close_connection = True

    def _deltas(self, texts: list[str], finish: bool = False) -> None:
        for text in texts:
            self._sse(json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}))
        if finish:
            self._sse(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))

    def _usage(self, prompt: int, completion: int) -> None:
        self._sse(json.dumps({"choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        }}))

    def _sse(self, data: str) -> None:
        event = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, value: dict) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def provider():
    p = Provider()
    thread = threading.Thread(target=p.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield p
    p.release.set()
    p.shutdown()
    p.server_close()


def openai_agent(api, provider: Provider, model: str, **config) -> str:
    return register(api, "openai", baseUrl=provider.url, model=model, apiKeyEnv=KEY_VARIABLE, **config)


def test_openai_streams_deltas_and_a_message_becomes_the_next_turn(api, provider):
    agent = openai_agent(api, provider, "chat", system="Be brief.")
    started = start(api, agent, "Greet me", "prompt")
    wait_for(lambda: output(api, started["id"]) == "Hello world", what="the first completion's deltas")
    assert api.post(f"/tasks/{started['id']}/messages", json={"message": "Thanks!"}).status_code == 202
    provider.release.set()

    done = until_status(api, started["id"])
    assert done["status"] == "done", done
    assert done["result"] == "You said: Thanks!"  # the deliverable: the last completion
    assert output(api, started["id"]) == "Hello worldYou said: Thanks!"
    assert {c["payload"]["stream"] for c in events(api, started["id"], "task.output")} == {"text"}

    (first_headers, first), (_, second) = provider.requests
    assert first_headers["Authorization"] == "Bearer sk-loopback"
    assert first["stream"] is True and first["model"] == "chat"
    assert first["stream_options"] == second["stream_options"] == {"include_usage": True}
    # Each completion's final usage chunk, summed over the run: 2 then 4 messages sent, 7 tokens back.
    (completed,) = events(api, started["id"], "task.completed")
    assert completed["payload"]["usage"] == {"promptTokens": 600, "completionTokens": 14, "costUsd": None}
    assert first["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet me"}]
    assert second["messages"] == first["messages"] + [
        {"role": "assistant", "content": "Hello world"}, {"role": "user", "content": "Thanks!"},
    ]


@pytest.mark.parametrize(
    ("model", "says"),
    [("broken", "HTTP 500: the model fell over"), ("hangup", "connection"), ("garbage", "Malformed chunk")],
)
def test_openai_provider_failures_fail_the_run_with_a_clear_reason(api, provider, model, says):
    started = start(api, openai_agent(api, provider, model), "Hello?", "prompt")
    failed = until_status(api, started["id"])
    assert failed["status"] == "failed"
    assert says in failed["error"], failed["error"]
    (reason,) = events(api, started["id"], "task.failed")
    assert reason["payload"]["reason"] == "error"


def test_openai_slow_stream_cancelled_closes_the_http_stream(api, provider):
    started = start(api, openai_agent(api, provider, "slow"), "Count slowly", "prompt")
    wait_for(lambda: "tick" in output(api, started["id"]), what="the stream to start")
    assert api.post(f"/tasks/{started['id']}/cancel").json()["status"] == "cancelled"
    # The stream would tick on for 30 s: it is cut only if the cancel closes the connection.
    assert provider.disconnected.wait(10), "the provider's stream was not closed"
    assert events(api, started["id"])[-1]["type"] == "task.cancelled"


def test_openai_silent_provider_times_out_instead_of_hanging(api, provider):
    agent = openai_agent(api, provider, "chat", readTimeoutSeconds="0.5")  # `chat` stalls until released
    started = start(api, agent, "Hello?", "prompt")
    failed = until_status(api, started["id"])
    assert failed["status"] == "failed" and "did not answer in time" in failed["error"]


# --- registering and choosing agents ---------------------------------------------------------------


def test_only_an_admin_registers_a_shell_agent(mc, api):
    writer = mc.client(mc.token("agent-writer", "agent:write,task:read"))
    refused(writer.post("/agents", json={"name": "sh", "kind": "shell"}), 403)
    assert writer.post("/agents", json={"name": "e", "kind": "exec", "config": {"argv": ["true"]}}).status_code == 201
    assert api.post("/agents", json={"name": "sh", "kind": "shell"}).status_code == 201


@pytest.mark.parametrize(
    ("kind", "config", "mentions"),
    [
        ("shell", {"enviroment": ["HOME"]}, "enviroment"),
        ("exec", {}, "argv"),
        ("openai", {"baseUrl": "http://127.0.0.1:1/v1", "model": "m", "apiKeyEnv": "MC_WEBHOOK_SECRET"}, "apiKeyEnv"),
    ],
)
def test_a_config_the_kind_cannot_run_with_is_refused_at_registration(api, kind, config, mentions):
    refused(api.post("/agents", json={"name": "bad", "kind": kind, "config": config}), 400, mentions=(mentions,))


def test_run_picks_the_agent_and_refuses_unsuitable_ones(api):
    shell = register(api, "shell")
    prompt = api.post("/tasks", json={"type": "prompt", "content": "hi"}).json()
    refused(api.post(f"/tasks/{prompt['id']}/run", json={"agentId": shell}), 409, "agent_mismatch")
    command = api.post("/tasks", json={"type": "command", "content": "echo hi"}).json()
    exec_agent = register(api, "exec", argv=["cat"])
    refused(api.post(f"/tasks/{command['id']}/run", json={"agentId": exec_agent}), 409, "agent_mismatch")

    assert api.post(f"/agents/{shell}/pause").status_code == 200
    refused(api.post(f"/tasks/{command['id']}/run", json={"agentId": shell}), 503, "agent_unavailable")
    assert api.post(f"/agents/{shell}/resume").status_code == 200
    assert api.post(f"/tasks/{command['id']}/run", json={"agentId": shell}).status_code == 200
    done = until_status(api, command["id"])
    assert (done["agentId"], done["result"]) == (shell, "hi\n")  # the shell ran it, not echo
