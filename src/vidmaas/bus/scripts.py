"""Lua scripts sent by digest: EVALSHA first, the source only when Redis lacks it.

Guarantees:
- ``Script.run`` (asyncio clients) and ``Script.run_sync`` (blocking clients) answer
  exactly what ``EVAL`` of the source answers; a Redis without the script in its
  cache (restarted, failed over, ``SCRIPT FLUSH``) answers NOSCRIPT, which runs the
  source once with ``EVAL`` (which caches it again). NOSCRIPT means the script did
  not run, so the call is neither lost nor run twice.
- The digest is computed once, when the script is defined, so a call sends some forty
  bytes instead of the script's source (kilobytes for the queue's scripts).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError


@dataclass(frozen=True, slots=True)
class Script:
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", digest)

    async def run(self, client: aioredis.Redis, numkeys: int, *keys_and_args: Any) -> Any:
        try:
            return await client.evalsha(self.sha, numkeys, *keys_and_args)
        except NoScriptError:
            return await client.eval(self.source, numkeys, *keys_and_args)

    def run_sync(self, client: redis.Redis, numkeys: int, *keys_and_args: Any) -> Any:
        try:
            return client.evalsha(self.sha, numkeys, *keys_and_args)
        except NoScriptError:
            return client.eval(self.source, numkeys, *keys_and_args)
