"""``vidmaas users …`` over a running server's admin API and on its database directly."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.live import LiveServer
from vidmaas.bus import keys
from vidmaas.cli import main
from vidmaas.client import Client, ClientError
from vidmaas.client.users_cli import choose
from vidmaas.domain.fairness import Share
from vidmaas.services import Services

MODES = ["remote", "local"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in ("VIDMAAS_API_KEY", "VIDMAAS_SERVER", "VIDMAAS_CONFIG",
                 "VIDMAAS_DATABASE_URL", "VIDMAAS_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    monkeypatch.chdir(tmp_path)
    yield


class Cli:
    """Runs ``vidmaas users …`` one way: over the API, or on the server's database."""

    def __init__(self, mode: str, live: LiveServer, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> None:
        self.live, self.capsys = live, capsys
        self.conn = ["--server", live.url, "--api-key", live.keys["root"]] \
            if mode == "remote" else []
        if mode == "local":
            monkeypatch.setenv("VIDMAAS_DATABASE_URL", live.settings.database.url)
            monkeypatch.setenv("VIDMAAS_REDIS_URL", live.settings.redis.url)

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = await asyncio.to_thread(main, ["users", *argv, *self.conn])
        got = self.capsys.readouterr()
        return rc, got.out, got.err


async def me(live: LiveServer, key: str) -> dict[str, object]:
    return await asyncio.to_thread(lambda: Client(live.url, key).me())


@pytest.mark.parametrize("mode", MODES)
async def test_users_are_made_changed_disabled_and_keyed_the_same_either_way(
        mode: str, live: LiveServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    live.settings.api.key_cache_ttl_s = 0  # changes made on the database show at once
    cli = Cli(mode, live, monkeypatch, capsys)
    rc, out, _ = await cli("create", "frank", "--weight", "3", "--max-priority", "high",
                           "--gpu-seconds-day", "900")
    assert rc == 0, out
    key = out.strip().splitlines()[-1]
    assert key.startswith("vmk_") and "shown once" in out
    who = await me(live, key)
    assert (who["name"], who["weight"], who["max_priority"]) == ("frank", 3.0, "high")
    svc: Services = live.app.state.services
    frank_id = str(who["id"])
    assert await svc.redis.hget(keys.USER_SHARES, frank_id) == Share(3.0, 0).encode()

    rc, out, _ = await cli("list")
    assert rc == 0 and "frank\tuser" in out and "alice\tuser" in out and "root\tadmin" in out
    rc, out, _ = await cli("show", "frank")
    assert "gpu_seconds_day    900" in out and "queued_tasks       50 (default)" in out
    rc, out, _ = await cli("update", "frank", "--weight", "default", "--queued-tasks", "5",
                           "--gpu-seconds-day", "default")
    assert rc == 0 and "weight 1\t" in out
    who = await me(live, key)
    assert who["limits"] == {"queued_tasks": 5, "gpus_at_once": None, "gpu_seconds_day": None,
                             "gpu_seconds_month": None}
    assert await svc.redis.hget(keys.USER_SHARES, frank_id) == Share(1.0, 0).encode()

    rc, out, _ = await cli("disable", "frank")
    assert rc == 0 and "disabled" in out
    with pytest.raises(ClientError):
        await me(live, key)
    assert (await cli("enable", frank_id))[0] == 0
    assert (await me(live, key))["name"] == "frank"

    rc, out, _ = await cli("keys", "create", "frank", "--name", "ci", "--expires-in-s", "600")
    second = out.strip().splitlines()[-1]
    assert rc == 0 and (await me(live, second))["name"] == "frank"
    rc, out, _ = await cli("keys", "list", "frank")
    lines = out.strip().splitlines()
    assert len(lines) == 2 and "\tci\tactive\t" in lines[1] and second not in out
    key_id = lines[1].split("\t")[0]
    assert (await cli("keys", "revoke", key_id))[0] == 0
    with pytest.raises(ClientError):
        await me(live, second)
    rc, out, _ = await cli("key", "frank", "--revoke-others")
    third = out.strip().splitlines()[-1]
    assert rc == 0 and (await me(live, third))["name"] == "frank"
    with pytest.raises(ClientError):
        await me(live, key)


@pytest.mark.parametrize("mode", MODES)
async def test_mistakes_exit_1_with_the_servers_code(
        mode: str, live: LiveServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(mode, live, monkeypatch, capsys)
    for argv, code in ((["create", "alice"], "user_exists"),
                       (["create", "gina", "--weight", "500"], "invalid_weight"),
                       (["update", "alice", "--max-priority", "urgent"], "invalid_priority"),
                       (["show", "nobody"], "user_not_found"),
                       (["keys", "revoke", "99999"], "key_not_found")):
        rc, _, err = await cli(*argv)
        assert rc == 1 and f"vidmaas: {code}:" in err, (argv, err)


async def test_a_plain_users_key_cannot_manage_users(
        live: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    rc = await asyncio.to_thread(main, ["users", "list", "--server", live.url,
                                        "--api-key", live.keys["alice"]])
    assert rc == 1 and "vidmaas: admin_required:" in capsys.readouterr().err


def test_where_users_commands_act_follows_flags_then_environment_then_config(
        tmp_path: Path) -> None:
    def args(**given: str | None) -> argparse.Namespace:
        base: dict[str, str | None] = {"data_dir": None, "server": None, "api_key": None,
                                       "config": None}
        return argparse.Namespace(**(base | given))

    env: dict[str, str] = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert choose(args(data_dir="d"), env | {"VIDMAAS_API_KEY": "k"}) == "local"
    assert choose(args(server="http://x"), env | {"VIDMAAS_DATABASE_URL": "db"}) == "remote"
    assert choose(args(api_key="k"), env) == "remote"
    assert choose(args(), env | {"VIDMAAS_DATABASE_URL": "db", "VIDMAAS_API_KEY": "k"}) \
        == "local"
    assert choose(args(), env | {"VIDMAAS_API_KEY": "k"}) == "remote"
    assert choose(args(), env) == "local"
    config = tmp_path / "vidmaas" / "config.toml"
    config.parent.mkdir()
    config.write_text('api_key = "vmk_x"\n')
    assert choose(args(), env) == "remote"
