"""The README as a new user reads it: its tour runs as written against a real server, and the
documents it names are in the repository (issue 12, item 19)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import Server

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_document_the_readme_names_is_in_the_repository():
    named = set(re.findall(r"[\w./-]+\.md\b", README)) - {"README.md"}
    assert named, "the README names its contract"
    missing = sorted(name for name in named if not (ROOT / name).is_file())
    assert not missing, f"the README names documents the repository lacks: {missing}"


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="the tour needs curl and jq")
@pytest.mark.sqlite_file  # the tour is the one-machine tour, on the SQLite file
def test_the_tour_runs_as_written_and_leaves_the_checkout_clean(tmp_path):
    tour = README[README.index("## A five-minute tour"):README.index("## Following the activity stream")]
    script = "\n".join(re.findall(r"```sh\n(.*?)```", tour, re.S))
    checkout = tmp_path / "checkout"  # stands in for the user's checkout: var/ and .venv/ in it
    server = Server(checkout / "var").start()
    try:
        (checkout / ".venv").symlink_to(Path(sys.executable).parent.parent)
        script = script.replace("http://127.0.0.1:8000", server.base_url)
        ran = subprocess.run(["bash", "-c", script], cwd=checkout, capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    out = ran.stdout
    # The results the tour shows right after its runs: they hold because the tour waits for them.
    assert '{"status":"done","result":"Hello\\n\\nSay hello to Mission Control"}' in out
    assert '{"status":"awaiting_input","inputPrompt":"Which planet?"}' in out
    assert '{"status":"review","result":"Write the launch note"}' in out
    assert '{"status":"done","result":"hello from Linux\\n"}' in out
    assert '{"name":"ranked.csv","direction":"output","size":14}' in out and "grace,5\nada,3\n2\n" in out
    assert '{"number":1,"desktopId":"local","status":"done","exitCode":null,"reason":null}' in out
    assert '[{"content":"Urgent, for lab-1","priority":9,"queuePosition":1},' in out
    assert '{"status":"done","result":"Find the numbers\\n\\nChart them"}' in out
    assert "draining\nonline\n" in out
    assert '{"promptTokens":1234,"completionTokens":567,"costUsd":"0.0005253","unpricedRuns":0}' in out
    assert "crossed the budget of agent metered" in out and '"budget_exceeded"\n{"costUsd":"0.0010506"}\n' in out
    # Each flow again with `mission-control`, a client of the same server.
    assert "Say hello to Mission ControlHello\n\nSay hello from the CLIHello\n\nSay hello from the CLI" in out
    assert "Plan the trip\nMarsPlan the trip\nMars" in out  # the curl output, then --follow's own
    assert '{"status":"pending","runs":2}' in out and "Write the FAQexit 3\ndone\n" in out
    assert '["rejected","approved","approved","rejected"]' in out
    assert re.search(r"^local\s+online\s+shell,exec,openai,echo\s+0/5\s", out, re.M)
    assert "task.completed  task-" in out and "\nLinux\n" in out
    assert out.endswith("exit 4\n") and "mission-control: Task id 'not-a-uuid' is not a valid UUID." in ran.stderr
    assert re.search(r"ok: \d+ events, head \d+; the digest checked: event \d+ still carries its hash\n", out), (
        out, ran.stderr)
    assert re.search(r"imported \d+ events into ", out), ran.stderr
    assert sorted(p.name for p in checkout.iterdir()) == [".venv", "var"]  # no export, no replica left behind
