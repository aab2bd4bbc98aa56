"""Making the object store a URL or the settings describe.

Guarantees: ``s3://bucket/prefix`` gives an ``S3Store``, ``file:///dir`` (or
``file://./relative``) a ``LocalStore``; anything else is an ``InvalidRequest`` naming
``storage_url``. Credentials come only from the arguments (or the AWS chain when None).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from vidmaas.config import StorageSettings
from vidmaas.errors import InvalidRequest
from vidmaas.storage.base import LocalStore, ObjectStore
from vidmaas.storage.s3 import S3Store


def open_store(url: str, *, endpoint_url: str | None = None, public_endpoint_url: str | None = None,
               region: str = "us-east-1", access_key_id: str | None = None,
               secret_access_key: str | None = None) -> ObjectStore:
    """A store for ``s3://bucket/prefix`` or ``file:///dir`` (``file://./rel`` is relative)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        raw = parsed.netloc + parsed.path if parsed.netloc in (".", "..") else parsed.path
        if parsed.netloc not in ("", ".", "..", "localhost"):
            raise InvalidRequest(f"file URL must be local: {url}", field="storage_url")
        return LocalStore(Path(raw or "."))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidRequest(f"S3 URL needs a bucket: {url}", field="storage_url")
        return S3Store(bucket=parsed.netloc, prefix=parsed.path.strip("/"),
                       endpoint_url=endpoint_url, public_endpoint_url=public_endpoint_url,
                       region=region, access_key_id=access_key_id,
                       secret_access_key=secret_access_key)
    raise InvalidRequest(f"storage URL must be s3:// or file://, not {url[:40]!r}",
                         field="storage_url")


def store_from_settings(settings: StorageSettings) -> ObjectStore:
    """The store the settings describe."""
    return open_store(
        settings.url, endpoint_url=settings.s3_endpoint_url,
        public_endpoint_url=settings.s3_public_endpoint_url, region=settings.s3_region,
        access_key_id=(settings.s3_access_key_id.get_secret_value()
                       if settings.s3_access_key_id else None),
        secret_access_key=(settings.s3_secret_access_key.get_secret_value()
                           if settings.s3_secret_access_key else None))
