"""Event streams to clients: one shared Redis reader per process, bounded buffers per
connection (the wire format is in docs/streams-and-openai.md).

The parts, each with its own guarantees:

- ``hub``: ``StreamHub``, the per-process reader of task streams (one blocked
  ``XREAD`` for every watched task), the fan-out to connections, discovery of new
  tasks for multiplexed connections, and queue-position pushes;
- ``connection``: ``Connection``, one client — snapshot first, then every event after
  the resume point with no gap and no duplicate, catch-up when it lags, the end of a
  task's stream, keep-alive pings;
- ``outbox``: the bounded per-connection buffer and its dropping/coalescing rules;
- ``messages``: framing of the client messages (built by ``domain.events``), the
  exceptions that end a stream early;
- ``resume``: the strict reading of a multiplexed stream's resume list (``?after=`` or
  the client's ``resume`` message), bounded;
- ``protocols``: ``Subscriber`` (what the hub delivers to) and ``HubView`` (what a
  connection uses of the hub), so that ``hub`` and ``connection`` never import each
  other.
"""

from vidmaas.api.streams.connection import Connection, open_connection
from vidmaas.api.streams.hub import StreamHub, install_hub
from vidmaas.api.streams.messages import (
    GoingAway,
    Message,
    TooSlow,
    dumps,
    snapshot_of,
    sse_frame,
    valid_stream_id,
)
from vidmaas.api.streams.outbox import Outbox
from vidmaas.api.streams.protocols import HubView, Subscriber
from vidmaas.api.streams.resume import parse_after, parse_resume_message

__all__ = [
    "Connection",
    "GoingAway",
    "HubView",
    "Message",
    "Outbox",
    "StreamHub",
    "Subscriber",
    "TooSlow",
    "dumps",
    "install_hub",
    "open_connection",
    "parse_after",
    "parse_resume_message",
    "snapshot_of",
    "sse_frame",
    "valid_stream_id",
]
