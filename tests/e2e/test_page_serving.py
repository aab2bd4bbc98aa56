"""How the page is served, without a browser: the policy for presigned media URLs."""

from __future__ import annotations

from vidmaas.api.routes.ui import store_origin
from vidmaas.config import Settings, StorageSettings


def test_media_may_come_from_the_object_store_only_when_downloads_redirect_to_it() -> None:
    local = Settings(storage=StorageSettings(url="file:///tmp/objects"))
    s3 = Settings(storage=StorageSettings(url="s3://b/p", s3_endpoint_url="http://s3.local:8333",
                                          s3_public_endpoint_url="https://media.example.com/x"))
    aws = Settings(storage=StorageSettings(url="s3://b/p"))
    streamed = Settings(storage=StorageSettings(url="s3://b/p", redirect_downloads=False))
    assert store_origin(local) is None and store_origin(streamed) is None
    assert store_origin(s3) == "https://media.example.com"
    assert store_origin(aws) == "https://*.amazonaws.com"
