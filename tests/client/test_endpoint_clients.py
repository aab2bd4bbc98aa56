"""The webhook endpoint calls of both Python clients, against a live server."""

from __future__ import annotations

import pytest

from tests.client.live import LiveServer
from tests.client.test_admin_clients import Either
from tests.client.test_both_clients import KINDS
from vidmaas.client import ClientError

PUBLIC = "http://93.184.216.34/hooks"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_user_manages_webhook_endpoints_through_either_client(
        kind: str, live: LiveServer) -> None:
    alice, bob = Either(kind, live.url, live.keys["alice"]), Either(kind, live.url,
                                                                    live.keys["bob"])
    made = await alice.call("create_endpoint", PUBLIC, events=["start", "completed"],
                            description="ci")
    assert made["secret"].startswith("whsec_") and made["events"] == ["started", "completed"]
    listed = await alice.call("list_endpoints", limit=5)
    assert [e["id"] for e in listed["data"]] == [made["id"]]
    assert "secret" not in listed["data"][0]
    changed = await alice.call("update_endpoint", made["id"], {"enabled": False})
    assert changed["enabled"] is False
    assert (await alice.call("get_endpoint", made["id"]))["enabled"] is False
    with pytest.raises(ClientError) as e:
        await alice.call("test_endpoint", made["id"])
    assert (e.value.status, e.value.code) == (409, "webhook_endpoint_disabled")
    await alice.call("update_endpoint", made["id"], {"enabled": True})
    sent = await alice.call("test_endpoint", made["id"])
    log = await alice.call("endpoint_deliveries", made["id"], limit=10)
    assert [d["id"] for d in log["data"]] == [sent["id"]]
    with pytest.raises(ClientError) as e:
        await bob.call("get_endpoint", made["id"])
    assert (e.value.status, e.value.code) == (404, "webhook_endpoint_not_found")
    assert (await alice.call("delete_endpoint", made["id"]))["deleted"] is True
    assert (await alice.call("list_endpoints"))["data"] == []
