"""What every backend's artifact store must do, through the ArtifactStore interface alone: bytes come
back as they went in, under their SHA-256, kept once; a refused upload (too large, empty) keeps
nothing; and two stores on one log's storage (two nodes) serve each other's bytes."""

from __future__ import annotations

import hashlib

import pytest

from service.artifacts import CHUNK_BYTES, Empty, NotStored, TooLarge, digest, open_store


async def chunks(*parts: bytes):
    for part in parts:
        yield part


async def read(store, sha256: str) -> bytes:
    return b"".join([chunk async for chunk in store.get(sha256)])


@pytest.fixture
async def opened():
    stores = []

    async def open_(log):
        stores.append(open_store(log))
        await stores[-1].prepare()
        return stores[-1]

    yield open_
    for store in stores:
        await store.close()


async def test_bytes_come_back_under_their_hash_whatever_their_chunks(log_factory, opened):
    store = await opened(await log_factory())
    data = bytes(range(256)) * (CHUNK_BYTES // 256 * 2 + 3)  # more than two of the store's chunks
    pieces = [data[i:i + 70_001] for i in range(0, len(data), 70_001)]
    stored = await store.put(chunks(*pieces), len(data))
    assert stored == (hashlib.sha256(data).hexdigest(), len(data))
    assert await store.has(stored.sha256)
    assert await read(store, stored.sha256) == data
    assert await digest(store, stored.sha256) == stored.sha256
    assert await store.put(chunks(data), len(data)) == stored  # kept once, answered alike
    assert await read(store, stored.sha256) == data


async def test_a_refused_upload_keeps_nothing(log_factory, opened):
    store = await opened(await log_factory())
    with pytest.raises(TooLarge):
        await store.put(chunks(b"a" * 600, b"b" * 600), 1000)
    for kept in (b"a" * 600 + b"b" * 600, b"a" * 600, b"a" * 600 + b"b" * 400):
        assert not await store.has(hashlib.sha256(kept).hexdigest())
    with pytest.raises(Empty):
        await store.put(chunks(), 1000)
    assert not await store.has(hashlib.sha256(b"").hexdigest())
    with pytest.raises(NotStored):
        await read(store, "0" * 64)


async def test_two_nodes_on_one_log_serve_each_others_artifacts(log_factory, opened):
    first_log = await log_factory()
    first, second = await opened(first_log), await opened(await log_factory.reopen(first_log))
    stored = await first.put(chunks(b"shared bytes"), 100)
    assert await second.has(stored.sha256)
    assert await read(second, stored.sha256) == b"shared bytes"
