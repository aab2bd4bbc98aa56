"""A small typed Python client for a vidmaas server.

Guarantees: importing this package does nothing but define names (no network, no
environment reads); every error the server answers is raised as ``ClientError`` with
the server's ``status``, ``code``, ``message`` and ``field``. ``Client`` (blocking,
``client.sync``) and ``AsyncClient`` (asyncio, ``client.aio``) share one wire module
(``client.wire``: requests, answers, messages) and one watch policy (``client.watch``),
so they offer the same calls and follow a task the same way.

    from vidmaas.client import Client

    with Client("http://127.0.0.1:8000", api_key) as c:
        task = c.submit("a red fox in the snow", model="tiny-t2v")
        for event in c.watch(task["id"]):
            print(event["type"], event.get("data"))
        c.download(task["id"], "fox.mp4")
"""

from vidmaas.client.aio import AsyncClient
from vidmaas.client.sync import Client
from vidmaas.client.wire import TERMINAL_STATUSES, ClientError

__all__ = ["TERMINAL_STATUSES", "AsyncClient", "Client", "ClientError"]
