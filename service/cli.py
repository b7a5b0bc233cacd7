"""The `mission-control` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

from events import IdempotencyConflict, Meta, RecordedEvent, StorageError, WrongExpectedVersion, open_log, streams
from events import types as t
from events.envelope import decode
from events.verify import ChainBroken, Rechain, verify_chain
from projections.readmodels import read_models
from service.artifacts import export_to, import_from, open_store, problems, recorded
from service.client import cli as client_commands
from service.http import auth
from service.settings import Settings, env_name, from_env

ADMIN_TOKEN_FILE = "admin-token"


def _env(name: str, default=None):
    return os.environ.get(env_name(name), default)


def _data_dir(args, *, create: bool = False, **overrides) -> Settings:
    """The command's settings, once its data dir is fit to use."""
    return _fit_data_dir(from_env(data_dir=args.data_dir, database_url=args.database_url, **overrides), create)


def _fit_data_dir(settings: Settings, create: bool) -> Settings:
    """`settings` once its data dir is fit to use. Only `serve` and `import` create one
    (`create`): any other command on a mistyped path must fail, not leave an empty log there."""
    path = Path(settings.data_dir)
    if path.exists() and not path.is_dir():
        raise _Failed(f"the data dir {path} is not a directory")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)  # private, as the log is
        except OSError as exc:
            raise _Failed(f"cannot create the data dir {path}: {exc.strerror}") from None
    elif not settings.database_url and not settings.database.is_file():
        raise _Failed(f"no log at {settings.database}; `serve` or `import` creates one")
    return settings


async def _with_log(settings: Settings, work):
    """work(log, read models) on the data dir's log."""
    log = open_log(settings.log_url, durable=settings.durable)
    models = read_models(log)
    await log.open()
    try:
        await models.prepare()
        return await work(log, models)
    finally:
        await log.close()


@contextlib.contextmanager
def _progress(description: str, unit: str = "events") -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr when it is a terminal (stdout may be carrying an export);
    None otherwise. Yields `update(done, total)`."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


# --- serve ---------------------------------------------------------------------


BOOTSTRAP_KEY = "mission-control:first-admin-key"
"""The idempotency key of the first admin key: nodes starting together on an empty log all
issue with it, the log takes the first and refuses the others (their tokens differ)."""


async def first_admin_key(settings: Settings) -> str | None:
    """On a log without keys: issue an admin key, write it to a 0600 file, return it (once, on
    one node however many start together)."""

    async def work(log, models):
        if await models.api_keys():
            return None
        try:
            _, token = await auth.issue_key(log, models, "admin", ["admin"], actor="mission-control:serve",
                                            idempotency_key=BOOTSTRAP_KEY)
        except IdempotencyConflict:  # another node issued it first
            return None
        path = Path(settings.data_dir) / ADMIN_TOKEN_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a file left from an earlier data dir keeps its mode otherwise
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        return token

    return await _with_log(settings, work)


CONTRACT_SETTINGS = ("max_concurrent", "lease_seconds")
"""Settings every node of one log must share: they shape what the API promises (the limit on
runs at once, how long a lease lasts), and nodes that differ would break it between them."""


def _recorded_settings(settings: Settings) -> t.SettingsRecorded:
    return t.SettingsRecorded(max_concurrent=settings.max_concurrent,
                              lease_milliseconds=round(settings.lease_seconds * 1000))


def _as_settings(recorded: t.SettingsRecorded) -> dict[str, float]:
    """The recorded values under their settings' names, in the settings' units."""
    return {"max_concurrent": recorded.max_concurrent, "lease_seconds": recorded.lease_milliseconds / 1000}


async def agree_settings(log, settings: Settings, accept: bool) -> None:
    """Record this node's contract settings on a log that has none (of nodes starting together,
    the first to append is kept); on a log that has others, refuse to serve (_Failed), or with
    `accept` record this node's as the log's from now on."""
    ours = _recorded_settings(settings)
    while True:
        recorded = await log.last_event(streams.SETTINGS)
        theirs = None if recorded is None else decode(recorded)
        differ = [] if theirs is None else [
            (name, _as_settings(ours)[name], _as_settings(theirs)[name])
            for name in CONTRACT_SETTINGS if _as_settings(ours)[name] != _as_settings(theirs)[name]
        ]
        if theirs is not None and not differ:
            return
        if differ and not accept:
            raise _Failed(
                ", and ".join(f"{name} ({env_name(name)}) is {mine:g} on this node but {other:g} in the log"
                              for name, mine, other in differ)
                + f" at {settings.log_name}: every node of one log runs with the same; to change it, stop every "
                "node and start one with --accept-settings"
            )
        try:
            await log.append(streams.SETTINGS, [ours], expected=0 if recorded is None else recorded.version,
                             meta=Meta(actor="mission-control:serve"))
            return
        except WrongExpectedVersion:  # another node recorded its settings meanwhile: compare with those
            continue


def serve(args) -> int:
    from service.http import serving
    from service.app import create_app
    from service.http.logs import configure

    configure()
    settings = from_env(
        data_dir=args.data_dir, database_url=args.database_url, host=args.host, port=args.port,
        processes=args.processes, local_desktop=args.local_desktop, no_local_desktop=args.no_local_desktop,
    )
    nodes = _nodes(settings)
    try:  # the address first: a busy port must not cost an admin key or an admin-token file
        sockets = ([serving.listen(settings.host, settings.port)] if settings.processes == 1
                   else serving.listen_shared(settings.host, settings.port, settings.processes))
    except serving.AddressInUse as exc:
        return _fail(str(exc))
    _fit_data_dir(settings, create=True)
    asyncio.run(_with_log(settings, lambda log, _: agree_settings(log, settings, args.accept_settings)))
    token = asyncio.run(first_admin_key(settings))
    if token is not None:
        print(f"Issued the first admin key (also in {Path(settings.data_dir) / ADMIN_TOKEN_FILE}, mode 0600):")
        print(token, flush=True)

    def ready() -> None:
        where = serving.url(settings.host, settings.port)
        data = f"its log in {settings.log_name}, " if settings.database_url else ""
        processes = f" in {settings.processes} processes" if settings.processes > 1 else ""
        print(f"Mission Control is listening on {where}{processes} with {data}its data in "
              f"{Path(settings.data_dir).resolve()}", flush=True)

    def run(node: Settings, sock, on_ready: Callable[[], None], webhooks: bool = True) -> int:
        # uvicorn stops gracefully on SIGTERM (and SIGINT), then raises the signal again so that the
        # process dies by it (status -15). A graceful stop is a success: exit 0 on that signal instead.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        if settings.processes > 1:  # a child: its parent says when to stop, and that is no interruption either
            signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
        serving.run(create_app(node, webhooks=webhooks), node, sock, on_ready)
        return 0

    if settings.processes == 1:
        return run(settings, sockets[0], ready)
    from service.http import supervisor

    def child(number: int, on_ready: Callable[[], None]) -> int:
        for other in sockets[:number - 1] + sockets[number:]:
            other.close()  # this child's copies: the parent keeps every slot's socket
        # Process 1 alone sends webhooks and notifications: every process folds the same log, and each would send
        # every delivery before it saw another's record of it. Deliveries wait while it restarts.
        return run(nodes[number - 1], sockets[number - 1], on_ready, webhooks=number == 1)

    given_up = supervisor.supervise(settings.processes, child, ready)
    return 0 if given_up is None else _fail(given_up)


def _nodes(settings: Settings) -> list[Settings]:
    """The settings of each process of `serve --processes N`: every one a node of the log, with a
    desktop of its own, NAME-1 ... NAME-N (a node's desktop is that node's: it recovers and keeps
    its runs alone, and a restarted process ends only its own desktop's runs)."""
    import msgspec

    count = settings.processes
    if count == 1:
        return [settings]
    longest = f"{settings.local_desktop}-{count}"
    if not settings.no_local_desktop and len(longest) > 63:
        raise _Failed(f"the local desktop's name {settings.local_desktop!r} is too long for --processes {count}: "
                      f"each process's desktop is named after it, up to {longest!r}, and a name has at most 63 "
                      "characters")
    return [msgspec.structs.replace(settings, local_desktop=f"{settings.local_desktop}-{n}")
            for n in range(1, count + 1)]


# --- tokens ----------------------------------------------------------------------


def token_create(args) -> int:
    settings = _data_dir(args)
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]

    async def work(log, models):
        return await auth.issue_key(log, models, args.user, scopes, args.project, actor="mission-control:cli",
                                    desktop=args.desktop)

    try:
        key_id, token = asyncio.run(_with_log(settings, work))
    except ValueError as exc:
        return _fail(str(exc))
    print(f"key {key_id} for {args.user} with {', '.join(scopes)}"
          + (f" as desktop {args.desktop}" if args.desktop else ""))
    print(token)
    return 0


def token_list(args) -> int:
    settings = _data_dir(args)
    keys = asyncio.run(_with_log(settings, lambda _, models: models.api_keys()))
    rows = [("ID", "USER", "STATE", "SCOPES", "PROJECT", "DESKTOP")] + [
        (key.id, key.user, "revoked" if key.revoked else "active", ",".join(key.scopes), key.project_id or "",
         key.desktop_id or "")
        for key in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[5]]).rstrip())
    return 0


def token_revoke(args) -> int:
    settings = _data_dir(args)

    async def work(log, models):
        return await auth.revoke_key(log, models, args.key_id, actor="mission-control:cli")

    try:
        asyncio.run(_with_log(settings, work))
    except ValueError as exc:
        return _fail(str(exc))
    print(f"revoked {args.key_id}")
    return 0


# --- the auditor's commands ------------------------------------------------------------


def verify(args) -> int:
    settings = _data_dir(args)
    against = None
    if args.against:
        position, _, digest = args.against.partition(":")
        if not position.isdigit() or len(digest) != 64:
            return _fail("--against takes POSITION:HASH with the whole 64-digit hash, as GET /audit/digest gives them")
        against = (int(position), digest.lower())

    async def work(log, progress):
        report = await verify_chain(log, against=against, progress=progress)
        store = open_store(log)
        await store.prepare()
        named = await recorded(log)
        return report, named, await problems(store, named)

    with _progress("verifying") as progress:
        report, named, damaged = asyncio.run(_with_log(settings, lambda log, _: work(log, progress)))
    for sentence in damaged:
        print(f"mission-control: {sentence}", file=sys.stderr)
    if report.ok and not damaged:
        checked = f"; the digest checked: event {against[0]} still carries its hash" if against else ""
        print(f"ok: {report.checked} events, head {report.head}{checked}")
        if named:
            print(f"ok: {len(named)} artifacts match their hashes")
        return 0
    if report.ok:
        return 1
    if against is not None and report.first_bad_position > report.head:  # the chain held to the head
        print(f"mission-control: the digest's position {against[0]} lies beyond the head {report.head}: "
              "this log is shorter than the one the digest was taken of", file=sys.stderr)
        return 1
    print(f"broken at position {report.first_bad_position}: {report.reason}", file=sys.stderr)
    return 1


def export(args) -> int:
    import msgspec

    settings = _data_dir(args)
    encoder = msgspec.json.Encoder()
    out = sys.stdout.buffer

    async def work(log, progress):
        after, head = args.after, await log.read_head()
        while after < head:
            page = await log.read_all(after, 5000, until=head)
            out.write(b"".join(encoder.encode(e) + b"\n" for e in page.events))
            after = page.next
            if progress:
                progress(after, head)
        out.flush()
        if args.artifacts:
            store = open_store(log)
            await store.prepare()
            await export_to(store, await recorded(log), Path(args.artifacts))

    with _progress("exporting") as progress:
        asyncio.run(_with_log(settings, lambda log, _: work(log, progress)))
    return 0


class _ExportLine(RecordedEvent, forbid_unknown_fields=True):
    """A line of an export. The hash covers every field the API serves, so a field added to
    a line is a change to the file, as API.md's rule (and scripts/verify_export.py) sees it."""


def _recorded(path: Path, progress: Callable[[int, int], None] | None) -> Iterator[RecordedEvent]:
    """The export's events, one a line. A line that is no recorded event breaks the chain there."""
    import msgspec

    decoder = msgspec.json.Decoder(_ExportLine)
    size, done, count = path.stat().st_size, 0, 0
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            done += len(line)
            if not line.strip():
                continue
            try:
                event = decoder.decode(line)
            except msgspec.DecodeError as exc:
                raise ChainBroken(count + 1, f"line {number} is not a recorded event ({exc})") from None
            count += 1
            yield event
            if progress and count % 5000 == 0:
                progress(done, size)
    if progress:
        progress(size, size)


def _artifacts_named(path: Path) -> set[str]:
    """The SHA-256 of every artifact an export's events name."""
    import msgspec

    named = set()
    with path.open("rb") as lines:
        for line in lines:
            if b'"artifact.' in line:  # a cheap test first: most lines are no artifact's
                event = msgspec.json.decode(line)
                if event["type"].startswith("artifact."):
                    named.add(event["payload"]["sha256"])
    return named


def import_(args) -> int:
    source = Path(args.file)
    if not source.is_file():
        return _fail(f"no file {source}")
    settings = _data_dir(args, create=True)

    rechain = Rechain() if args.rechain else None

    async def work(log, progress):
        head = await log.read_head()
        if head:
            raise _Failed(f"{settings.log_name} already holds {head} events; import needs an empty data dir")
        if args.artifacts:  # every artifact's bytes first, so no event names bytes this store lacks
            store = open_store(log)
            await store.prepare()
            missing = await import_from(store, _artifacts_named(source), Path(args.artifacts))
            if missing:
                raise _Failed(f"refused {source}, nothing imported: {'; '.join(missing[:5])}")
        events = _recorded(source, progress)
        return await log.import_recorded(rechain.carry(events, "mission-control:cli") if rechain else events)

    try:
        with _progress("importing", "bytes") as progress:
            head = asyncio.run(_with_log(settings, lambda log, _: work(log, progress)))
    except ChainBroken as broken:
        print(f"mission-control: refused {source}, nothing imported: {broken}", file=sys.stderr)
        return 1
    print(f"imported {head} events into {settings.log_name}")
    if rechain and rechain.first_changed is not None:
        print(f"re-hashed in RFC 8785 form from position {rechain.first_changed} ({rechain.changed} events "
              f"re-encoded); the old head {rechain.old.position}:{rechain.old.previous} is recorded at "
              f"position {head} (log.rechained)")
    elif rechain:
        print("nothing needed re-hashing: the chain already holds under RFC 8785")
    return 0


def rebuild(args) -> int:
    settings = _data_dir(args)
    with _progress("rebuilding read models") as progress:
        position = asyncio.run(_with_log(settings, lambda _, models: models.rebuild(progress)))
    print(f"rebuilt every read model from {position} events")
    return 0


# --- worker ------------------------------------------------------------------------------------


def worker(args) -> int:
    from service.work import worker as remote

    if not args.server or not args.token:
        return _fail("worker needs --server URL and --token T (or MC_SERVER and MC_TOKEN): the key is a worker "
                     "key, from `token create --scopes worker --desktop NAME`")
    try:
        agents = remote.parse_agents(args.agents)
    except ValueError as exc:
        return _fail(str(exc))
    if args.capacity < 1:
        return _fail(f"--capacity must be at least 1, not {args.capacity}")
    options = remote.Options(server=args.server, token=args.token, desktop=args.desktop or None, agents=agents,
                             capacity=args.capacity, workdir=Path(args.workdir))
    return remote.main(options)


class _Failed(Exception):
    """A command cannot do what was asked: one line for the user, exit 2."""


def _fail(message: str) -> int:
    print(f"mission-control: {message}", file=sys.stderr)
    return 2


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="mission-control",
        description="Hand tasks to AI agents and shell workers, watch them run, prove what happened.",
        epilog="Example: mission-control serve --port 8000 --data-dir ./var",
    )
    root.add_argument("--version", action="version", version=f"%(prog)s {version('mission-control')}")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn, help_: str, example: str):
        sub = commands.add_parser(name, help=help_, description=help_, epilog=f"Example: {example}")
        sub.set_defaults(fn=fn)
        return sub

    def data_dir(sub):
        sub.add_argument("--data-dir", default=_env("data_dir"),
                         help=f"where the log lives (default ./var; env {env_name('data_dir')})")
        sub.add_argument("--database", dest="database_url", metavar="URL", default=_env("database_url"),
                         help="the log in PostgreSQL, postgresql://user@host:port/db, instead of the data dir's "
                              f"SQLite file (env {env_name('database_url')})")

    sub = command("serve", serve, "Run the service on the embedded SQLite log, or on PostgreSQL (--database).",
                  "mission-control serve --host 127.0.0.1 --port 8000 --data-dir ./var")
    sub.add_argument("--host", default=_env("host"), help="address to listen on (default 127.0.0.1; env MC_HOST)")
    sub.add_argument("--port", type=int, default=_env("port"), help="port (default 8000; env MC_PORT)")
    sub.add_argument("--processes", type=int, default=None, metavar="N",
                     help="serve from N processes on the one port, each a node of the log with a desktop of its own, "
                          "NAME-1 ... NAME-N (default 1; env MC_PROCESSES)")
    sub.add_argument("--local-desktop", default=None,
                     help="the name of this node's own desktop (default local; env MC_LOCAL_DESKTOP)")
    sub.add_argument("--no-local-desktop", action="store_true", default=None,
                     help="run nothing in this process: every run goes to a worker (env MC_NO_LOCAL_DESKTOP)")
    sub.add_argument("--accept-settings", action="store_true",
                     help="record this node's MC_MAX_CONCURRENT and MC_LEASE_SECONDS as the log's, where they differ "
                          "(stop every other node first)")
    data_dir(sub)

    token = command("token", None, "Issue, list and revoke API keys.",
                    "mission-control token create --user alice --scopes task:read,task:write")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    sub = token_commands.add_parser("create", help="issue a key; the token is printed once, on the last line",
                                    description="Issue an API key; the token is printed once, on the last line.",
                                    epilog="Example: mission-control token create --user alice --scopes task:read")
    sub.set_defaults(fn=token_create)
    sub.add_argument("--user", required=True, help="the user the key acts as")
    sub.add_argument("--scopes", required=True, help=f"comma list of {', '.join(auth.SCOPES)}")
    sub.add_argument("--project", default=None, help="restrict the key to this project (its id or its name)")
    sub.add_argument("--desktop", default=None,
                     help="a worker key's desktop (with --scopes worker): the one desktop it may act as")
    data_dir(sub)
    sub = token_commands.add_parser("list", help="list keys (never their secrets)",
                                    description="List the API keys: id, user, state, scopes (never their secrets).",
                                    epilog="Example: mission-control token list")
    sub.set_defaults(fn=token_list)
    data_dir(sub)
    sub = token_commands.add_parser("revoke", help="revoke a key by id",
                                    description="Revoke an API key by its id: it is refused from then on.",
                                    epilog="Example: mission-control token revoke 0b7e…")
    sub.set_defaults(fn=token_revoke)
    sub.add_argument("key_id")
    data_dir(sub)

    sub = command("verify", verify, "Check the log's hash chain; exit 1 with the first bad position.",
                  "mission-control verify --against 1234:9f86d081…")
    sub.add_argument("--against", help="POSITION:HASH of a digest saved earlier that the log must still extend")
    data_dir(sub)

    sub = command("export", export, "Write the log as NDJSON, one recorded event a line, to stdout.",
                  "mission-control export --after 0 > log.ndjson")
    sub.add_argument("--after", type=int, default=0, help="start after this position")
    sub.add_argument("--artifacts", metavar="DIR", default=None,
                     help="also write every artifact's bytes the log names, as DIR/<sha256>")
    data_dir(sub)

    sub = command("import", import_, "Load an export into an empty data dir, checking the chain; "
                  "exit 1 with the first bad position, importing nothing.",
                  "mission-control import log.ndjson --data-dir ./replica")
    sub.add_argument("file", help="an NDJSON export, one recorded event a line")
    sub.add_argument("--rechain", action="store_true",
                     help="carry forward a log hashed with code-point key order (before RFC 8785): re-encode and "
                          "re-hash it, recording the old head hash in a last log.rechained event")
    sub.add_argument("--artifacts", metavar="DIR", default=None,
                     help="the artifacts' bytes an `export --artifacts DIR` wrote: each is stored, checked against "
                          "its hash, before any event; one the export names that DIR lacks refuses the import")
    data_dir(sub)

    sub = command("worker", worker, "Run this machine as a desktop of a server until SIGTERM, which drains it.",
                  "mission-control worker --server https://mc.example --token $KEY --agents echo,shell")
    sub.add_argument("--server", default=_env("server"), help="the server's URL (env MC_SERVER)")
    sub.add_argument("--token", default=_env("token"),
                     help="a worker key: token create --scopes worker --desktop NAME (env MC_TOKEN)")
    sub.add_argument("--desktop", default=_env("desktop"),
                     help="the desktop's name; it must be the key's (default: the key's; env MC_DESKTOP)")
    sub.add_argument("--agents", default=_env("agents", "echo,openai"),
                     help="the agent kinds this machine runs, a comma list of echo, openai, shell, exec (default "
                          "echo,openai: shell and exec run programs here, so only when named; env MC_AGENTS)")
    sub.add_argument("--capacity", type=int, default=_env("capacity", 1),
                     help="how many runs at once (default 1; env MC_CAPACITY)")
    sub.add_argument("--workdir", default=_env("workdir", "./mission-control-worker"),
                     help="where the runs' working directories live (default ./mission-control-worker; env MC_WORKDIR)")

    client_commands.register(commands)

    sub = command("rebuild", rebuild, "Drop every read model and refold it from the log.",
                  "mission-control rebuild --data-dir ./var")
    data_dir(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except _Failed as exc:
        return _fail(str(exc))
    except StorageError as exc:
        return _fail(f"the log cannot be read: {exc}")
    except BrokenPipeError:  # e.g. `mission-control export | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
