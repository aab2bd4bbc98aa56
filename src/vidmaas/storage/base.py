"""The object store interface and its two implementations.

Guarantees:
- Keys are server-made (``input_key``, ``output_key``, ``preview_key``); ``check_key`` refuses any
  key that could escape its prefix (``..``, absolute, backslashes, control chars).
- Every method is async; blocking SDK calls run in worker threads.
- Writes are all-or-nothing: the local store writes to a temporary file and renames
  it; S3 puts are atomic by nature.
- Errors from the backend are raised as ``StorageError`` (``from`` the cause);
  a missing object is ``NotFound``.
- ``head`` gives a stored object's size and ETag (what ``storage.retry.upload_verified``
  checks an upload against); a missing object is ``NotFound``.
- ``presign_get`` gives a time-limited URL, or None where the store cannot make one
  (the local directory): the API then streams the bytes itself.
- ``open`` has the object open (the file opened, the GET answered) before it returns,
  so a missing object or a store that is down is an error the caller can still answer
  with a status; only a failure in the middle of the bytes comes later, from
  ``Download.chunks``, as ``StorageError``.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vidmaas.errors import InvalidRequest, NotFound, StorageError

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,511}$")
CHUNK_BYTES = 1024 * 1024


def check_key(key: str) -> str:
    if not _KEY_RE.match(key) or ".." in key.split("/") or "//" in key:
        raise InvalidRequest(f"bad object key {key[:60]!r}", field="key")
    return key


def input_key(task_id: str, filename: str) -> str:
    return check_key(f"inputs/{task_id}/{filename}")


def outputs_prefix(task_id: str) -> str:
    """Where every output of the task lives: video, poster, spritesheet, previews."""
    return check_key(f"outputs/{task_id}") + "/"


def output_key(task_id: str, filename: str) -> str:
    return check_key(outputs_prefix(task_id) + filename)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the store says about a stored object."""

    size: int
    etag: str = ""
    """As the store gives it (S3: the MD5 of a single-part, unencrypted upload)."""
    encryption: str | None = None
    """S3's ``ServerSideEncryption`` (``aws:kms`` makes the ETag no MD5)."""


@dataclass(frozen=True, slots=True)
class Download:
    """An object opened for reading: its size and its bytes, in chunks (read once)."""

    size: int
    chunks: AsyncIterator[bytes]


PREVIEW_FILENAME = "preview.jpg"


def preview_key(task_id: str) -> str:
    """The task's latest live preview image (JPEG), overwritten by each new one."""
    return output_key(task_id, PREVIEW_FILENAME)


class ObjectStore(Protocol):
    """What every store offers."""

    url: str

    async def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None: ...
    async def put_file(self, key: str, path: Path, *, content_type: str) -> None: ...
    async def get_bytes(self, key: str) -> bytes: ...
    async def download(self, key: str, path: Path) -> None: ...
    async def exists(self, key: str) -> bool: ...
    async def size(self, key: str) -> int: ...
    async def head(self, key: str) -> ObjectInfo: ...
    async def delete(self, key: str) -> None: ...
    async def delete_prefix(self, prefix: str) -> int: ...
    async def presign_get(self, key: str, *, ttl_s: int, filename: str | None = None,
                          ) -> str | None: ...
    async def open(self, key: str) -> Download: ...
    async def ensure_ready(self) -> None: ...


class LocalStore:
    """A directory on this machine (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = self.root.as_uri()

    def path(self, key: str) -> Path:
        """The file of a key (the key is checked first)."""
        return self.root / check_key(key)

    async def ensure_ready(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    def _write(self, key: str, data: bytes) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        try:
            await asyncio.to_thread(self._write, key, data)
        except OSError as e:
            raise StorageError(f"cannot write {key}: {e}") from e

    async def put_file(self, key: str, path: Path, *, content_type: str) -> None:
        data = await asyncio.to_thread(path.read_bytes)
        await self.put_bytes(key, data, content_type=content_type)

    async def get_bytes(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as e:
            raise NotFound(f"no object {key}") from e
        except OSError as e:
            raise StorageError(f"cannot read {key}: {e}") from e

    async def download(self, key: str, path: Path) -> None:
        data = await self.get_bytes(key)
        await asyncio.to_thread(path.write_bytes, data)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path(key).is_file)

    async def size(self, key: str) -> int:
        try:
            return (await asyncio.to_thread(self.path(key).stat)).st_size
        except FileNotFoundError as e:
            raise NotFound(f"no object {key}") from e

    async def head(self, key: str) -> ObjectInfo:
        return ObjectInfo(size=await self.size(key))

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.path(key).unlink, missing_ok=True)

    async def delete_prefix(self, prefix: str) -> int:
        base = self.path(prefix.rstrip("/"))

        def _rm() -> int:
            if not base.exists():
                return 0
            n = 0
            for p in sorted(base.rglob("*"), reverse=True):
                if p.is_file():
                    p.unlink()
                    n += 1
                else:
                    p.rmdir()
            base.rmdir()
            return n

        return await asyncio.to_thread(_rm)

    async def presign_get(self, key: str, *, ttl_s: int, filename: str | None = None,
                          ) -> str | None:
        return None

    async def open(self, key: str) -> Download:
        path = self.path(key)
        try:
            f = await asyncio.to_thread(path.open, "rb")
            size = os.fstat(f.fileno()).st_size
        except FileNotFoundError as e:
            raise NotFound(f"no object {key}") from e

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
                    yield chunk
            except OSError as e:
                raise StorageError(f"reading {key} failed: {e}") from e
            finally:
                f.close()

        return Download(size=size, chunks=chunks())
