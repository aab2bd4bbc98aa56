"""The S3 store (AWS or any S3-compatible service).

Guarantees: see ``storage.base``. Keys live under the URL's prefix; presigned URLs are
signed for the public endpoint when one is configured (browsers reach the store
through it) and expire after ``ttl_s``. A failure that is an outage (no connection, a
timeout, a 5xx, a throttling answer; also when boto3 wraps one) is raised as
``StorageUnavailable``, any other as ``StorageError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error, RetriesExceededError
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from vidmaas.errors import NotFound, StorageError, StorageUnavailable
from vidmaas.storage.base import CHUNK_BYTES, Download, ObjectInfo, check_key

_MISSING = {"404", "NoSuchKey", "NotFound"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "ServiceUnavailable", "InternalError", "RequestTimeoutException"}
_TRANSIENT_ERRORS = (BotoConnectionError, HTTPClientError, IncompleteReadError,
                     ResponseStreamingError, ConnectionError, TimeoutError)


def _outage(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it wraps: boto3 re-raises a ClientError as
    ``S3UploadFailedError``, a failed read as ``RetriesExceededError``) is an outage."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(exc.response.get("Error", {}).get("Code", ""))
            return status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES
        if isinstance(exc, _TRANSIENT_ERRORS):
            return True
        if isinstance(exc, RetriesExceededError):
            exc = getattr(exc, "last_exception", None)
        else:
            exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class S3Store:
    def __init__(self, *, bucket: str, prefix: str, endpoint_url: str | None,
                 public_endpoint_url: str | None, region: str, access_key_id: str | None,
                 secret_access_key: str | None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        session = boto3.session.Session(aws_access_key_id=access_key_id,
                                        aws_secret_access_key=secret_access_key,
                                        region_name=region)
        cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                     retries={"max_attempts": 3, "mode": "standard"},
                     connect_timeout=5, read_timeout=60)
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, config=cfg)
        self._public: Any = (session.client("s3", endpoint_url=public_endpoint_url, config=cfg)
                             if public_endpoint_url else self._client)

    def _k(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _call(self, what: str, fn: Any, /, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, **kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise NotFound(f"no object {kwargs.get('Key', '')}") from e
            error = StorageUnavailable if _outage(e) else StorageError
            raise error(f"S3 {what} failed: {code or e}") from e
        except (BotoCoreError, Boto3Error) as e:  # S3UploadFailedError is a Boto3Error
            error = StorageUnavailable if _outage(e) else StorageError
            raise error(f"S3 {what} failed: {e}") from e

    async def ensure_ready(self) -> None:
        try:
            await self._call("head_bucket", self._client.head_bucket, Bucket=self.bucket)
        except NotFound:
            await self._call("create_bucket", self._client.create_bucket, Bucket=self.bucket)

    async def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        await self._call("put", self._client.put_object, Bucket=self.bucket, Key=self._k(key),
                         Body=data, ContentType=content_type)

    async def put_file(self, key: str, path: Path, *, content_type: str) -> None:
        await self._call("upload", self._client.upload_file, Filename=str(path),
                         Bucket=self.bucket, Key=self._k(key),
                         ExtraArgs={"ContentType": content_type})

    async def get_bytes(self, key: str) -> bytes:
        resp = await self._call("get", self._client.get_object, Bucket=self.bucket,
                                Key=self._k(key))
        return await asyncio.to_thread(resp["Body"].read)

    async def download(self, key: str, path: Path) -> None:
        await self._call("download", self._client.download_file, Bucket=self.bucket,
                         Key=self._k(key), Filename=str(path))

    async def exists(self, key: str) -> bool:
        try:
            await self._call("head", self._client.head_object, Bucket=self.bucket,
                             Key=self._k(key))
        except NotFound:
            return False
        return True

    async def size(self, key: str) -> int:
        head = await self._call("head", self._client.head_object, Bucket=self.bucket,
                                Key=self._k(key))
        return int(head["ContentLength"])

    async def head(self, key: str) -> ObjectInfo:
        head = await self._call("head", self._client.head_object, Bucket=self.bucket,
                                Key=self._k(key))
        return ObjectInfo(size=int(head["ContentLength"]), etag=str(head.get("ETag", "")),
                          encryption=head.get("ServerSideEncryption"))

    async def delete(self, key: str) -> None:
        await self._call("delete", self._client.delete_object, Bucket=self.bucket,
                         Key=self._k(key))

    async def delete_prefix(self, prefix: str) -> int:
        resp = await self._call("list", self._client.list_objects_v2, Bucket=self.bucket,
                                Prefix=self._k(prefix.rstrip("/")) + "/")
        keys = [{"Key": o["Key"]} for o in resp.get("Contents", [])]
        if keys:
            await self._call("delete", self._client.delete_objects, Bucket=self.bucket,
                             Delete={"Objects": keys})
        return len(keys)

    async def presign_get(self, key: str, *, ttl_s: int, filename: str | None = None,
                          ) -> str | None:
        params: dict[str, str] = {"Bucket": self.bucket, "Key": self._k(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        try:
            url = await asyncio.to_thread(self._public.generate_presigned_url, "get_object",
                                          Params=params, ExpiresIn=ttl_s)
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"S3 presign failed: {e}") from e
        return str(url)

    async def open(self, key: str) -> Download:
        resp = await self._call("get", self._client.get_object, Bucket=self.bucket,
                                Key=self._k(key))
        body = resp["Body"]

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await asyncio.to_thread(body.read, CHUNK_BYTES):
                    yield chunk
            except (BotoCoreError, ClientError, OSError) as e:
                raise StorageError(f"S3 read of {key} failed: {e}") from e
            finally:
                body.close()

        return Download(size=int(resp["ContentLength"]), chunks=chunks())
