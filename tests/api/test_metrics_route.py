"""The api role's /metrics."""

from __future__ import annotations

from tests.api.conftest import Api


async def test_metrics_report_queue_depth_capacity_tasks_and_requests(api: Api) -> None:
    for _ in range(2):
        r = await api.client.post("/v1/tasks", json={"prompt": "x"}, headers=api.auth("alice"))
        assert r.status_code == 202
    await api.client.get("/v1/tasks/t0000000000000000000000000", headers=api.auth("alice"))
    body = (await api.client.get("/metrics")).text
    assert 'vidmaas_tasks{status="queued"} 2.0' in body
    assert "vidmaas_queue_depth_total 2.0" in body
    assert "vidmaas_gpu_capacity 1.0" in body
    assert 'route="/v1/tasks/{task_id}"' in body
    assert "t0000000000000000000000000" not in body
