"""The object stores behind one interface: a local directory and a real S3 server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from vidmaas.config import StorageSettings
from vidmaas.errors import InvalidRequest, NotFound, StorageError
from vidmaas.storage import ObjectStore, store_from_settings
from vidmaas.storage.base import check_key


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest) -> ObjectStore:
    name = "local_storage" if request.param == "local" else "s3_storage"
    s = store_from_settings(request.getfixturevalue(name))
    await s.ensure_ready()
    return s


async def test_objects_round_trip_through_bytes_files_and_streams(store: ObjectStore,
                                                                  tmp_path: Path) -> None:
    await store.put_bytes("outputs/t1/a.bin", b"hello", content_type="application/octet-stream")
    src = tmp_path / "big.bin"
    src.write_bytes(b"x" * 3_000_000)
    await store.put_file("outputs/t1/big.bin", src, content_type="application/octet-stream")
    assert await store.get_bytes("outputs/t1/a.bin") == b"hello"
    assert await store.size("outputs/t1/big.bin") == 3_000_000
    opened = await store.open("outputs/t1/big.bin")
    assert opened.size == 3_000_000
    assert b"".join([c async for c in opened.chunks]) == src.read_bytes()
    dest = tmp_path / "copy.bin"
    await store.download("outputs/t1/a.bin", dest)
    assert dest.read_bytes() == b"hello"
    assert await store.exists("outputs/t1/a.bin")
    assert await store.delete_prefix("outputs/t1") == 2
    assert not await store.exists("outputs/t1/a.bin")


async def test_a_missing_object_is_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        await store.get_bytes("outputs/none/x.mp4")
    with pytest.raises(NotFound):
        await store.size("outputs/none/x.mp4")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/../../b", "a\\b", "a\nb", ""])
def test_keys_that_could_escape_their_prefix_are_refused(key: str) -> None:
    with pytest.raises(InvalidRequest):
        check_key(key)


async def test_presigned_urls_are_signed_and_expire(s3_storage: StorageSettings) -> None:
    import asyncio

    store = store_from_settings(s3_storage)
    await store.ensure_ready()
    await store.put_bytes("outputs/t2/v.mp4", b"video", content_type="video/mp4")
    url = await store.presign_get("outputs/t2/v.mp4", ttl_s=1)
    assert url is not None
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).content == b"video"
        await asyncio.sleep(2.2)
        assert (await client.get(url)).status_code == 403


async def test_wrong_credentials_fail_as_a_storage_error(s3_storage: StorageSettings,
                                                         tmp_path: Path) -> None:
    bad = s3_storage.model_copy(update={"s3_secret_access_key": SecretStr("wrong")})
    store = store_from_settings(bad)
    with pytest.raises(StorageError):
        await store.put_bytes("outputs/t3/a", b"x", content_type="text/plain")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StorageError):
        await store.put_file("outputs/t3/f", src, content_type="text/plain")
