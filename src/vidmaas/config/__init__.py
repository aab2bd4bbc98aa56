"""Typed settings for every role, read from ``VIDMAAS_*`` environment variables.

Guarantees:
- One ``Settings`` object of nested groups, built explicitly (``Settings()``) and
  passed down; nothing here reads the environment at import time.
- A group's field is set by ``VIDMAAS_<GROUP>_<FIELD>`` (e.g. ``VIDMAAS_DATABASE_URL``,
  ``VIDMAAS_REDIS_URL``, ``VIDMAAS_STORAGE_URL``, ``VIDMAAS_DISPATCHER_MAX_ATTEMPTS``);
  top-level fields by ``VIDMAAS_<FIELD>`` (``VIDMAAS_EXECUTOR``, ``VIDMAAS_GPU_CAPACITY``).
- Every duration or size carries its unit in its name (``_s``, ``_ms``, ``_bytes``).
- Secrets are ``SecretStr``: they never print in a repr or a log line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from vidmaas.config.groups import (
    ApiSettings,
    DatabaseSettings,
    DispatcherSettings,
    KubeSettings,
    LocalExecutorSettings,
    OutboxSettings,
    QuotaSettings,
    RedisSettings,
    RelaySettings,
    RuntimeSettings,
    StorageSettings,
    WebhookSettings,
)
from vidmaas.config.pools import PoolModelSettings, PoolSettings

__all__ = [
    "ApiSettings",
    "DatabaseSettings",
    "DispatcherSettings",
    "KubeSettings",
    "LocalExecutorSettings",
    "OutboxSettings",
    "PoolModelSettings",
    "PoolSettings",
    "QuotaSettings",
    "RedisSettings",
    "RelaySettings",
    "RuntimeSettings",
    "Settings",
    "StorageSettings",
    "WebhookSettings",
    "embedded_settings",
    "settings_reference",
]

class Settings(BaseSettings):
    """All settings of every role. Build with ``Settings()`` (environment) or by keyword."""

    model_config = SettingsConfigDict(
        env_prefix="VIDMAAS_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",
        case_sensitive=False,
        use_attribute_docstrings=True,
    )

    executor: Literal["local", "kubernetes"] = "local"
    """Where jobs run: local process groups (``torchrun``) or Kubeflow PyTorchJobs."""
    gpu_capacity: int = 1
    """GPUs the dispatcher may hand out at once (summed over running jobs)."""
    models_path: Path | None = None
    """A model registry YAML of the operator's own; None uses the shipped one."""
    default_model: str | None = None
    """Model used when a request names none; None means the registry's first."""
    model_root: Path | None = None
    """Prefix for relative model directories in the registry (local executor)."""
    metrics_port: int = 9100
    """Port of the ``/metrics``, ``/healthz`` and ``/readyz`` server of the dispatcher and
    relay processes (the api serves them on its own port)."""
    metrics_host: str = "0.0.0.0"
    """Interface of that server."""
    log_level: str = "INFO"
    """Root log level."""
    log_json: bool = False
    """Write logs as JSON lines (production) instead of readable text."""
    data_dir: Path | None = None
    """The embedded instance's data directory, when running on one."""

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    dispatcher: DispatcherSettings = Field(default_factory=DispatcherSettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    local: LocalExecutorSettings = Field(default_factory=LocalExecutorSettings)
    kube: KubeSettings = Field(default_factory=KubeSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    pools: PoolSettings = Field(default_factory=PoolSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)


EMBEDDED_POOLS = ("tiny-t2v", "tiny-ti2v")
"""The models an embedded instance pools by default (its tiny ones)."""
EMBEDDED_IDLE_S = 180.0
"""How long an embedded instance keeps an idle warm worker."""


def embedded_settings(data_dir: Path, base: Settings | None = None) -> Settings:
    """Settings of an embedded instance living in ``data_dir``. Unless pools are off
    (``VIDMAAS_POOLS_ENABLED=false``) or named (``VIDMAAS_POOLS_MODELS``), the tiny
    models are pooled: a worker starts for the first task and stays warm a few minutes."""
    root = data_dir.resolve()
    s = base or Settings()
    pools = s.pools
    if pools.enabled and not pools.models:
        pools = pools.model_copy(update={"models": {
            m: PoolModelSettings(min_workers=0, max_workers=1, idle_s=EMBEDDED_IDLE_S)
            for m in EMBEDDED_POOLS}})
    return s.model_copy(update={
        "pools": pools,
        "data_dir": root,
        "database": s.database.model_copy(
            update={"url": f"sqlite+aiosqlite:///{root / 'vidmaas.db'}"}),
        "storage": s.storage.model_copy(update={"url": (root / "objects").as_uri()}),
        "local": s.local.model_copy(update={"work_root": root / "jobs"}),
        "model_root": root / "models",
    })


_GROUP_ENV = {"database": "DATABASE", "redis": "REDIS", "storage": "STORAGE", "api": "API",
              "dispatcher": "DISPATCHER", "quotas": "QUOTAS", "local": "LOCAL", "kube": "KUBE",
              "runtime": "RUNTIME", "webhooks": "WEBHOOKS", "relay": "RELAY",
              "pools": "POOLS", "outbox": "OUTBOX"}


def settings_reference() -> str:
    """The configuration reference as a Markdown table (the README embeds it)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]

    def add(env: str, field: object, default: object) -> None:
        desc = " ".join((getattr(field, "description", None) or "").split())
        if isinstance(default, SecretStr):
            default = "(secret)"
        shown = "" if default is None else f"`{default}`"
        rows.append(f"| `{env}` | {shown} | {desc} |")

    defaults = Settings.model_construct()
    for name, field in Settings.model_fields.items():
        if name in _GROUP_ENV:
            group = getattr(defaults, name)
            for sub, subfield in type(group).model_fields.items():
                add(f"VIDMAAS_{_GROUP_ENV[name]}_{sub.upper()}", subfield, getattr(group, sub))
        else:
            add(f"VIDMAAS_{name.upper()}", field, getattr(defaults, name))
    return "\n".join(rows) + "\n"
