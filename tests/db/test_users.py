"""Users and keys on both databases: who a key identifies, and what a user row means."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from vidmaas.config import QuotaSettings, Settings
from vidmaas.db import users
from vidmaas.db.engine import make_engine, make_sessionmaker
from vidmaas.db.models import User, utcnow
from vidmaas.domain.fairness import Priority, Share
from vidmaas.errors import Conflict, InvalidRequest, NotFound


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    await engine.dispose()


async def test_a_key_identifies_its_user_until_revoked_expired_or_the_user_is_disabled(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as s:
        alice = await users.create_user(session=s, name="alice")
        _, forever = await users.create_api_key(session=s, user_id=alice.id, name="laptop")
        soon = utcnow() + timedelta(hours=1)
        row, expiring = await users.create_api_key(session=s, user_id=alice.id, expires_at=soon)
        found = await users.identify(session=s, key=expiring)
        assert found is not None and found.user.id == alice.id
        assert found.expires_at == soon and found.key_id == row.id
        # Past its expiry the key identifies nobody; the other key still works.
        assert await users.identify(session=s, key=expiring, now=soon) is None
        assert await users.identify(session=s, key=forever, now=soon) is not None
        await users.set_disabled(session=s, user_id=alice.id, disabled=True)
        assert await users.identify(session=s, key=forever) is None
        await users.set_disabled(session=s, user_id=alice.id, disabled=False)
        assert await users.identify(session=s, key=forever) is not None
        await users.revoke_key(session=s, key_id=row.id)
        first = (await users.revoke_key(session=s, key_id=row.id)).revoked_at
        assert first is not None
        assert await users.identify(session=s, key=expiring) is None
        assert await users.identify(session=s, key="vmk_unknown") is None
        assert await users.identify(session=s, key="not-a-key") is None
        with pytest.raises(NotFound):
            await users.revoke_key(session=s, key_id=10_000)


async def test_last_used_is_written_once_per_resolution_not_per_lookup(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as s:
        alice = await users.create_user(session=s, name="alice")
        row, key = await users.create_api_key(session=s, user_id=alice.id)
        assert row.last_used_at is None
        t0 = utcnow()
        await users.identify(session=s, key=key, now=t0)
        await users.identify(session=s, key=key, now=t0 + timedelta(seconds=5))
        [k] = await users.list_keys(session=s, user_id=alice.id)
    async with sessions() as s:
        [k] = await users.list_keys(session=s, user_id=alice.id)
        assert k.last_used_at == t0
        later = t0 + timedelta(seconds=users.LAST_USED_RESOLUTION_S + 1)
        await users.identify(session=s, key=key, now=later)
    async with sessions() as s:
        [k] = await users.list_keys(session=s, user_id=alice.id)
        assert k.last_used_at == later


async def test_changes_are_validated_with_a_code_per_mistake() -> None:
    ok = users.check_changes({"name": "carol", "weight": 2, "max_priority": "high",
                              "quota_queued_tasks": 5, "quota_gpu_seconds_day": 3600.5,
                              "quota_gpus_at_once": None, "is_admin": True})
    assert ok["weight"] == 2.0 and ok["quota_queued_tasks"] == 5
    bad = [({"weight": 0}, "invalid_weight", "weight"),
           ({"weight": 1000}, "invalid_weight", "weight"),
           ({"weight": "heavy"}, "invalid_weight", "weight"),
           ({"max_priority": "urgent"}, "invalid_priority", "max_priority"),
           ({"quota_queued_tasks": -1}, "invalid_quota", "quota_queued_tasks"),
           ({"quota_gpus_at_once": 1.5}, "invalid_quota", "quota_gpus_at_once"),
           ({"quota_gpu_seconds_month": float("inf")}, "invalid_quota",
            "quota_gpu_seconds_month"),
           ({"name": " padded "}, "invalid_name", "name"),
           ({"name": ""}, "invalid_name", "name"),
           ({"is_admin": "yes"}, "invalid_request", "is_admin"),
           ({"password": "x"}, "invalid_request", "password")]
    for change, code, field in bad:
        with pytest.raises(InvalidRequest) as e:
            users.check_changes(change)
        assert (e.value.code, e.value.field) == (code, field), change


async def test_updates_reset_to_the_defaults_and_names_stay_unique(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    defaults = QuotaSettings(weight=1.5, max_priority="low")
    async with sessions() as s:
        alice = await users.create_user(session=s, name="alice", weight=3.0,
                                        max_priority="high", quotas={"quota_queued_tasks": 2})
        await users.create_user(session=s, name="bob")
        changed = await users.update_user(session=s, user_id=alice.id, defaults=defaults,
                                          changes={"weight": None, "max_priority": None,
                                                   "quota_queued_tasks": None})
        assert (changed.weight, changed.max_priority, changed.quota_queued_tasks) == (
            1.5, "low", None)
        with pytest.raises(Conflict) as e:
            await users.update_user(session=s, user_id=alice.id, defaults=defaults,
                                    changes={"name": "bob"})
        assert e.value.code == "user_exists"
        with pytest.raises(Conflict):
            await users.create_user(session=s, name="bob")
        with pytest.raises(NotFound):
            await users.update_user(session=s, user_id="u-missing", defaults=defaults,
                                    changes={})
        page = await users.list_users_page(session=s, limit=1)
        rest = await users.list_users_page(session=s, limit=10, after=page[0].id)
        assert [u.name for u in page + rest] == ["alice", "bob"]
        assert [u.name for u in await users.list_users_page(session=s, limit=10,
                                                            name="bob")] == ["bob"]


def test_a_user_row_gives_the_queue_share_and_the_quotas_with_defaults_filled_in() -> None:
    settings = Settings()
    settings.quotas.gpus_at_once = 4
    settings.quotas.gpu_seconds_day = 1000.0
    settings.api.max_queued_per_user = 7
    plain = User(id="u1", name="a", weight=1.0, max_priority="normal")
    own = User(id="u2", name="b", weight=2.5, max_priority="high", quota_gpus_at_once=1,
               quota_queued_tasks=3, quota_gpu_seconds_month=50.0)
    assert users.share_of(plain, settings.quotas) == Share(weight=1.0, gpu_cap=4)
    assert users.share_of(own, settings.quotas) == Share(weight=2.5, gpu_cap=1)
    limits = users.limits_of(plain, settings)
    assert (limits.queued_tasks, limits.gpus_at_once, limits.gpu_seconds_day,
            limits.gpu_seconds_month) == (7, 4, 1000.0, None)
    limits = users.limits_of(own, settings)
    assert (limits.queued_tasks, limits.gpus_at_once, limits.gpu_seconds_month) == (3, 1, 50.0)


def test_a_user_may_ask_for_a_priority_up_to_their_maximum() -> None:
    assert users.priority_for(None, maximum="normal") is Priority.NORMAL
    assert users.priority_for(None, maximum="low") is Priority.LOW
    assert users.priority_for("low", maximum="normal") is Priority.LOW
    assert users.priority_for("high", maximum="high") is Priority.HIGH
    for asked, maximum, code in (("high", "normal", "priority_not_allowed"),
                                 ("normal", "low", "priority_not_allowed"),
                                 ("urgent", "high", "invalid_priority")):
        with pytest.raises(InvalidRequest) as e:
            users.priority_for(asked, maximum=maximum)
        assert (e.value.code, e.value.field) == (code, "priority")
