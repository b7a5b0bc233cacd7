"""The ids the service mints (service/ids.py): random v4 UUIDs, read ahead from the OS's random
source, and never the same twice, in one process or in the processes `serve --processes` forks."""

from __future__ import annotations

import os
import uuid

from service.ids import new_id


def test_ids_are_canonical_v4_uuids_and_none_repeats_across_reads_of_the_random_source():
    ids = [new_id() for _ in range(1000)]  # several reads of the OS's source
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in ids)


def test_a_forked_child_mints_none_of_its_parents_ids():
    new_id()  # the parent has random bytes read ahead, which the child must not reuse
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.write(write, ",".join(new_id() for _ in range(300)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        theirs = set(pipe.read().decode().split(","))
    os.waitpid(child, 0)
    ours = {new_id() for _ in range(300)}
    assert len(theirs) == 300 and not ours & theirs
