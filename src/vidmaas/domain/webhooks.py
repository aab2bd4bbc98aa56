"""Webhook rules shared by the api (validation at task creation) and the relay (delivery).

Guarantees:
- Pure: no network, clock or database access of its own; name resolution is a
  callable passed in, so the same policy runs at creation time and at send time.
- ``sign`` follows the Standard Webhooks scheme: ``v1,`` + base64 of
  HMAC-SHA256(secret, ``"{webhook-id}.{webhook-timestamp}.{body}"``).
- ``check_target`` refuses (``TargetRefused``) any URL that is not http(s), carries
  credentials, or whose host resolves to a private, loopback, link-local, multicast,
  reserved or unspecified address (the cloud metadata address 169.254.169.254
  included), unless the host name or the address is in the allow-list. One refused
  address refuses the whole target: a name that resolves to a public and a private
  address could be made to reach either.
- ``delivery_id`` is a deterministic function of (url, task id, event id): recording
  the same event twice for the same target yields the same id, so it is sent once;
  ``endpoint_delivery_id`` is the same for a registered endpoint, keyed by its id (two
  endpoints on one URL are two receivers, each with its own secret).
- ``signing_key`` is the HMAC key of a secret: the base64-decoded part of a
  ``whsec_…`` endpoint secret (as Standard Webhooks libraries read it), the UTF-8 bytes
  of any other (the operator's ``signing_secret``).
- ``endpoint_events`` is the one reading of an endpoint's event filter: ``start`` is
  ``started`` (Replicate's name), duplicates go, the order is the canonical one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

# Event types a webhook subscriber can ask for, and those it gets by default.
SUBSCRIBABLE = frozenset({"started", "progress", "completed", "failed", "cancelled"})
DEFAULT_EVENTS = frozenset({"started", "completed", "failed", "cancelled"})
TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})

EVENT_ORDER = ("started", "progress", "completed", "failed", "cancelled")
EVENT_ALIASES = {"start": "started"}
"""Other names an endpoint's filter may use for an event type."""
OPENAI_EVENT_TYPES = {"completed": "video.completed", "failed": "video.failed"}
"""The OpenAI event types of a ``/v1/videos`` task's ends (OpenAI has no others)."""
SECRET_PREFIX = "whsec_"

SIGNATURE_VERSION = "v1"
MAX_URL_CHARS = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AllowEntry = IPAddress | ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> [address, ...]``: the addresses a host name resolves to."""

METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"),
                                ipaddress.ip_address("fd00:ec2::254")})


class TargetRefused(ValueError):
    """A webhook URL that may not be called. ``code`` is stable and machine-readable."""

    def __init__(self, message: str, *, code: str = "webhook_target_not_allowed") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed webhook URL."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    """Path and query, as sent in the request line."""


def parse_target(url: str) -> Target:
    """The parts of an http(s) URL; ``TargetRefused`` (``invalid_webhook_url``) if unusable."""
    if len(url) > MAX_URL_CHARS:
        raise TargetRefused("the webhook URL is too long", code="invalid_webhook_url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise TargetRefused(f"the webhook URL is malformed: {e}", code="invalid_webhook_url") from e
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise TargetRefused("the webhook URL must be http or https", code="invalid_webhook_url")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("the webhook URL must not carry credentials",
                            code="invalid_webhook_url")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise TargetRefused("the webhook URL has no host", code="invalid_webhook_url")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url=url, scheme=scheme, host=host,
                  port=port if port is not None else (443 if scheme == "https" else 80),
                  path=path)


def literal_address(host: str) -> IPAddress | None:
    """The address a host names literally (``127.0.0.1``, ``::1``), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def refusal_reason(address: IPAddress) -> str | None:
    """Why an address may not be called, or None if it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return refusal_reason(address.ipv4_mapped)
    if address in METADATA_ADDRESSES:
        return "the cloud metadata address"
    checks = (("loopback", address.is_loopback), ("link-local", address.is_link_local),
              ("multicast", address.is_multicast), ("unspecified", address.is_unspecified),
              ("reserved", address.is_reserved), ("private", address.is_private))
    for name, hit in checks:
        if hit:
            return f"a {name} address"
    if not address.is_global:
        return "a non-global address"
    return None


def _allowed(allow_hosts: Collection[str]) -> tuple[frozenset[str], list[AllowEntry]]:
    names: set[str] = set()
    nets: list[AllowEntry] = []
    for item in allow_hosts:
        value = item.strip().lower().rstrip(".")
        if not value:
            continue
        try:
            nets.append(ipaddress.ip_network(value.strip("[]"), strict=False)
                        if "/" in value else ipaddress.ip_address(value.strip("[]")))
        except ValueError:
            names.add(value)
    return frozenset(names), nets


def address_allowed(address: IPAddress, allow_hosts: Collection[str]) -> bool:
    """True if the allow-list names this address (or a network holding it)."""
    _, nets = _allowed(allow_hosts)
    for net in nets:
        if isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
            if address.version == net.version and address in net:
                return True
        elif address == net:
            return True
    return False


async def check_target(url: str, *, allow_hosts: Collection[str], resolve: Resolver,
                       ) -> tuple[Target, list[str]]:
    """The target and the addresses it may be called at; ``TargetRefused`` otherwise."""
    target = parse_target(url)
    names, _ = _allowed(allow_hosts)
    literal = literal_address(target.host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = await resolve(target.host, target.port)
        except OSError as e:
            raise TargetRefused(f"the webhook host {target.host[:100]!r} does not resolve",
                                code="webhook_host_unresolvable") from e
        if not addresses:
            raise TargetRefused(f"the webhook host {target.host[:100]!r} does not resolve",
                                code="webhook_host_unresolvable")
    if target.host in names:
        return target, addresses
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        reason = refusal_reason(address)
        if reason is not None and not address_allowed(address, allow_hosts):
            raise TargetRefused(f"the webhook host {target.host[:100]!r} resolves to {reason} "
                                f"({address}); add it to webhooks.allow_hosts to allow it")
    return target, addresses


def sign(*, secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    key = secret.encode() if isinstance(secret, str) else secret
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify(*, secret: str | bytes, msg_id: str, timestamp: int, body: bytes,
           signature_header: str) -> bool:
    """True if any signature in the (space-separated) header matches."""
    expected = sign(secret=secret, msg_id=msg_id, timestamp=timestamp, body=body)
    return any(hmac.compare_digest(expected, candidate)
               for candidate in signature_header.split())


def delivery_id(*, url: str, task_id: str, event_id: str) -> str:
    """The one delivery id (and ``webhook-id``) of a task's event for a target URL.

    Event ids are task-stream entry ids: unique within a task, not across tasks.
    """
    digest = hashlib.sha256(f"{url}\n{task_id}\n{event_id}".encode()).hexdigest()
    return "msg_" + digest[:40]


def endpoint_delivery_id(*, endpoint_id: str, task_id: str, event_id: str) -> str:
    """The one delivery id of a task's event for a registered endpoint."""
    return delivery_id(url=f"endpoint:{endpoint_id}", task_id=task_id, event_id=event_id)


def signing_key(secret: str) -> bytes:
    """The HMAC key of a signing secret (see the module docstring)."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except ValueError:
            pass
    return secret.encode()


def endpoint_events(requested: Iterable[str]) -> list[str]:
    """An endpoint's filter in canonical form; ``ValueError`` for an unknown type."""
    wanted = set()
    for name in requested:
        canonical = EVENT_ALIASES.get(name, name)
        if canonical not in SUBSCRIBABLE:
            raise ValueError(f"unknown webhook event type {name[:40]!r}")
        wanted.add(canonical)
    return [name for name in EVENT_ORDER if name in wanted]


def openai_envelope(*, delivery_id: str, task_id: str, event_type: str, created_at: int,
                    ) -> dict[str, object] | None:
    """OpenAI's webhook body for a ``/v1/videos`` task's end (None for other events)."""
    kind = OPENAI_EVENT_TYPES.get(event_type)
    if kind is None:
        return None
    return {"id": "evt_" + delivery_id.removeprefix("msg_"), "object": "event",
            "created_at": created_at, "type": kind, "data": {"id": task_id}}


def test_payload(*, endpoint_id: str, event_id: str, timestamp: str) -> dict[str, object]:
    """The body of an endpoint's test delivery (``POST /v1/webhook-endpoints/{id}/test``)."""
    return {"v": 1, "type": "test", "id": event_id, "timestamp": timestamp,
            "data": {"endpoint_id": endpoint_id,
                     "message": "a test delivery from vidmaas; no task is involved"}}


def wanted_events(requested: Iterable[str] | None) -> frozenset[str]:
    """The event types a task's webhook gets: its filter, or the default set."""
    if requested is None:
        return DEFAULT_EVENTS
    return frozenset(requested) & SUBSCRIBABLE


def backoff_s(*, attempt: int, initial_s: float, cap_s: float = 3600.0) -> float:
    """Delay before retry number ``attempt`` (1 = the first retry): doubling from initial."""
    return float(min(cap_s, initial_s * (2 ** max(0, attempt - 1))))
