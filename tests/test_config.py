"""Settings from plain environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from vidmaas.config import Settings, embedded_settings


def test_plain_environment_variables_set_nested_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "VIDMAAS_DATABASE_URL": "postgresql+asyncpg://u@db/vid",
        "VIDMAAS_REDIS_URL": "redis://cache:6379/2",
        "VIDMAAS_STORAGE_URL": "s3://videos/prod",
        "VIDMAAS_STORAGE_S3_ENDPOINT_URL": "http://s3:9000",
        "VIDMAAS_STORAGE_S3_SECRET_ACCESS_KEY": "hush",
        "VIDMAAS_EXECUTOR": "kubernetes",
        "VIDMAAS_GPU_CAPACITY": "16",
        "VIDMAAS_DISPATCHER_MAX_ATTEMPTS": "5",
        "VIDMAAS_DISPATCHER_PER_USER_RUNNING_CAP": "3",
        "VIDMAAS_API_MAX_UPLOAD_BYTES": "1000",
        "VIDMAAS_KUBE_KUEUE_QUEUE": "gpu-queue",
        "VIDMAAS_LOCAL_WORK_ROOT": "/tmp/jobs",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.database.url == "postgresql+asyncpg://u@db/vid"
    assert s.redis.url == "redis://cache:6379/2"
    assert s.storage.url == "s3://videos/prod"
    assert s.storage.s3_endpoint_url == "http://s3:9000"
    assert s.executor == "kubernetes"
    assert s.gpu_capacity == 16
    assert s.dispatcher.max_attempts == 5
    assert s.dispatcher.per_user_running_cap == 3
    assert s.api.max_upload_bytes == 1000
    assert s.kube.kueue_queue == "gpu-queue"
    assert s.local.work_root == Path("/tmp/jobs")
    assert "hush" not in repr(s)


def test_an_unknown_executor_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDMAAS_EXECUTOR", "slurm")
    with pytest.raises(ValueError, match="executor"):
        Settings()


def test_an_embedded_instance_keeps_everything_under_its_data_directory(tmp_path: Path) -> None:
    s = embedded_settings(tmp_path)
    assert s.database.url == f"sqlite+aiosqlite:///{tmp_path / 'vidmaas.db'}"
    assert s.storage.url == (tmp_path / "objects").as_uri()
    assert s.model_root == tmp_path / "models"
    assert s.local.work_root == tmp_path / "jobs"


def test_an_embedded_instance_pools_its_tiny_models_unless_pools_are_off_or_named(
        tmp_path: Path) -> None:
    pooled = embedded_settings(tmp_path).pools
    assert set(pooled.models) == {"tiny-t2v", "tiny-ti2v"}
    assert all(m.min_workers == 0 and 60 <= m.idle_s <= 600 for m in pooled.models.values())
    off = embedded_settings(tmp_path, Settings(pools={"enabled": False}))  # type: ignore[arg-type]
    assert off.pools.models == {}
    named = embedded_settings(tmp_path, Settings(
        pools={"models": {"tiny-ti2v": {"max_workers": 2}}}))  # type: ignore[arg-type]
    assert set(named.pools.models) == {"tiny-ti2v"}


def test_quota_defaults_come_from_their_own_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"VIDMAAS_QUOTAS_WEIGHT": "2.5", "VIDMAAS_QUOTAS_MAX_PRIORITY": "high",
                 "VIDMAAS_QUOTAS_GPUS_AT_ONCE": "4",
                 "VIDMAAS_QUOTAS_GPU_SECONDS_DAY": "36000"}.items():
        monkeypatch.setenv(k, v)
    q = Settings().quotas
    assert (q.weight, q.max_priority, q.gpus_at_once, q.gpu_seconds_day,
            q.gpu_seconds_month) == (2.5, "high", 4, 36000.0, None)
    monkeypatch.setenv("VIDMAAS_QUOTAS_MAX_PRIORITY", "urgent")
    with pytest.raises(ValueError, match="max_priority"):
        Settings()
