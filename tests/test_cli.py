"""The `mission-control` command as a new user meets it: the installed console script in a
subprocess, on real data dirs (issue 12, items 15, 16 and 18)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import free_port

FIXTURE = Path(__file__).parent / "fixtures" / "v1-log.ndjson"
COMMAND = str(Path(sys.executable).parent / "mission-control")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=60)


def one_sentence(result: subprocess.CompletedProcess) -> str:
    """A refusal: a non-zero exit and one line on stderr, no traceback."""
    assert result.returncode != 0, result
    assert result.stderr.startswith("mission-control: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A data dir holding the 19 events of the fixture."""
    run("import", str(FIXTURE), "--data-dir", str(tmp_path / "data")).check_returncode()
    return tmp_path / "data"


def events_in(data_dir: Path) -> int:
    exported = run("export", "--data-dir", str(data_dir))
    exported.check_returncode()
    return exported.stdout.count("\n")


def every_command(data_dir: Path) -> list[list[str]]:
    return [
        ["token", "list"], ["token", "create", "--user", "alice", "--scopes", "task:read"],
        ["token", "revoke", "0b7e0000-0000-0000-0000-000000000000"], ["verify"], ["export"], ["rebuild"],
        ["import", str(FIXTURE)], ["serve", "--port", str(free_port())],
    ]


# --- 15: a bad data dir ----------------------------------------------------------------------


def test_a_data_dir_that_is_a_file_is_one_sentence_for_every_command(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a data dir\n")
    for command in every_command(a_file):
        stderr = one_sentence(run(*command, "--data-dir", str(a_file)))
        assert f"{a_file} is not a directory" in stderr, (command, stderr)
    assert a_file.read_text() == "not a data dir\n"


def test_only_serve_and_import_create_a_data_dir(tmp_path):
    missing = tmp_path / "nonexistent"
    for command in every_command(missing)[:-2]:
        stderr = one_sentence(run(*command, "--data-dir", str(missing)))
        assert f"no log at {missing}" in stderr, (command, stderr)
        assert not missing.exists(), command
    run("import", str(FIXTURE), "--data-dir", str(missing)).check_returncode()
    assert events_in(missing) == 19


def test_a_data_dir_that_cannot_be_created_is_one_sentence(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    stderr = one_sentence(run("import", str(FIXTURE), "--data-dir", str(a_file / "inside")))
    assert f"cannot create the data dir {a_file / 'inside'}" in stderr


# --- 16: token create --project ----------------------------------------------------------------


def test_a_refused_token_create_appends_nothing(data_dir):
    stderr = one_sentence(run("token", "create", "--user", "newcomer", "--scopes", "task:read",
                              "--project", "nope", "--data-dir", str(data_dir)))
    assert "no project with the id or name 'nope'" in stderr
    assert events_in(data_dir) == 19  # not even the newcomer's default project


def test_token_create_takes_a_project_by_name(data_dir):
    created = run("token", "create", "--user", "bob", "--scopes", "task:read",
                  "--project", "admin (default)", "--data-dir", str(data_dir))
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.split()[1]
    listed = run("token", "list", "--data-dir", str(data_dir)).stdout.splitlines()
    row = next(line for line in listed if line.startswith(key_id))
    assert row.split()[-1] == "8447b163-ed7f-5ad6-96b3-aa2cb69adbe2"  # the fixture's "admin (default)"


# --- 18: small things ----------------------------------------------------------------------------


def test_version_is_printed():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "mission-control 0.1.0\n"


def test_token_list_has_a_header_row(data_dir):
    lines = run("token", "list", "--data-dir", str(data_dir)).stdout.splitlines()
    assert lines[0].split() == ["ID", "USER", "STATE", "SCOPES", "PROJECT", "DESKTOP"]
    assert lines[1].startswith("957506fb-04a0-457f-884c-f579527aeeb3")  # the fixture's admin key


def test_revoking_a_revoked_key_says_so_and_fails(data_dir):
    key = "957506fb-04a0-457f-884c-f579527aeeb3"
    first = run("token", "revoke", key, "--data-dir", str(data_dir))
    assert first.returncode == 0 and first.stdout == f"revoked {key}\n"
    stderr = one_sentence(run("token", "revoke", key, "--data-dir", str(data_dir)))
    assert f"key {key} was already revoked" in stderr
    assert events_in(data_dir) == 20


# --- issue 15: the log in PostgreSQL ------------------------------------------------------------


def test_every_log_command_works_on_a_postgresql_database(tmp_path, postgres_database):
    url = postgres_database
    imported = run("import", str(FIXTURE), "--database", url, "--data-dir", str(tmp_path / "data"))
    assert imported.stdout == f"imported 19 events into {url}\n", imported.stderr
    created = run("token", "create", "--user", "alice", "--scopes", "task:read", "--database", url)
    assert created.returncode == 0, created.stderr
    listed = subprocess.run([COMMAND, "token", "list"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "MC_DATABASE_URL": url})  # the environment variable alike
    assert "alice" in listed.stdout, listed.stderr
    assert run("verify", "--database", url).stdout == "ok: 21 events, head 21\n"
    exported = run("export", "--database", url).stdout.splitlines()
    assert exported[:19] == FIXTURE.read_text().splitlines() and len(exported) == 21  # a default project, the key
    assert run("rebuild", "--database", url).stdout == "rebuilt every read model from 21 events\n"
    again = one_sentence(run("import", str(FIXTURE), "--database", url))
    assert f"{url} already holds 21 events" in again
    assert run("verify", "--database", url).stdout == "ok: 21 events, head 21\n"  # nothing of it imported


def test_a_database_url_that_is_not_postgresql_or_not_reachable_is_one_sentence(tmp_path):
    assert "is not postgresql://" in one_sentence(run("verify", "--database", "mysql://root@localhost/db"))
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    assert "the log cannot be read" in one_sentence(run("verify", "--database", unreachable))
