"""``GET /v1/tasks/{id}/preview`` against real SQLite/PostgreSQL, Redis and both stores."""

from __future__ import annotations

import io

from PIL import Image

from tests.api.conftest import Api
from vidmaas.storage.base import preview_key

TASK = {"prompt": "a heron in the reeds", "model": "tiny-t2v"}


def jpeg(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (256, 144), color).save(out, format="JPEG")
    return out.getvalue()


async def test_the_owner_gets_the_latest_preview_uncached_and_others_get_404(
        api_any_store: Api) -> None:
    api = api_any_store
    task = (await api.client.post("/v1/tasks", json=TASK, headers=api.auth("alice"))).json()
    url = f"/v1/tasks/{task['id']}/preview"
    store = api.app.state.services.store

    none_yet = await api.client.get(url, headers=api.auth("alice"))
    assert none_yet.status_code == 404 and none_yet.json()["error"]["code"] == "no_preview"

    await store.put_bytes(preview_key(task["id"]), jpeg((200, 20, 20)),
                          content_type="image/jpeg")
    first = await api.client.get(url, headers=api.auth("alice"))
    assert first.status_code == 200
    assert first.headers["content-type"] == "image/jpeg"
    assert first.headers["cache-control"] == "no-store"
    assert first.content == jpeg((200, 20, 20))

    await store.put_bytes(preview_key(task["id"]), jpeg((20, 20, 200)),
                          content_type="image/jpeg")
    second = await api.client.get(url, headers=api.auth("alice"))
    assert second.content == jpeg((20, 20, 200)), "the newer preview replaces the older"

    admin = await api.client.get(url, headers=api.auth("root"))
    assert admin.status_code == 200 and admin.content == second.content

    theirs = await api.client.get(url, headers=api.auth("bob"))
    missing = await api.client.get(f"/v1/tasks/t{'0' * 25}/preview", headers=api.auth("bob"))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == missing.json()
    assert theirs.json()["error"]["code"] == "task_not_found"
    assert (await api.client.get(url)).status_code == 401
