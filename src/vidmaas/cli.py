"""The ``vidmaas`` command: run roles, manage users, inspect models and manifests.

Guarantees: settings come from the environment (``VIDMAAS_*``) once, in ``main``;
``--data-dir`` points any database command at an embedded instance (its SQLite file
and object directory) instead; every command exits non-zero with a one-line message
on a vidmaas error; ``users create`` prints the new API key as its last line. The
``users`` commands (``client.users_cli``) work over a running server's admin API or,
through ``LocalUsers``, on a database directly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vidmaas.config import Settings, embedded_settings
from vidmaas.errors import VidmaasError

log = logging.getLogger("vidmaas")

Command = Callable[[argparse.Namespace, Settings], int]
T = TypeVar("T")
_COMMANDS: dict[str, Command] = {}


def _settings_for(args: argparse.Namespace, base: Settings) -> Settings:
    data_dir = getattr(args, "data_dir", None)
    if data_dir is None:
        return base
    s = embedded_settings(Path(data_dir), base)
    redis_url = _embedded_redis_url(Path(data_dir))
    if redis_url is not None:
        s = s.model_copy(update={"redis": s.redis.model_copy(update={"url": redis_url})})
    return s


def _embedded_redis_url(data_dir: Path) -> str | None:
    """The URL of a running ``vidmaas up``'s Redis, if it wrote one."""
    marker = data_dir / "redis.url"
    return marker.read_text().strip() if marker.is_file() else None


def command(name: str) -> Callable[[Command], Command]:
    def deco(fn: Command) -> Command:
        _COMMANDS[name] = fn
        return fn
    return deco


def _configure_logging(settings: Settings) -> None:
    try:
        from vidmaas.logs import configure_logging
    except ModuleNotFoundError:
        logging.basicConfig(level=settings.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    configure_logging(level=settings.log_level, json=settings.log_json)


# ---------------------------------------------------------------- server roles

@command("migrate")
def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from vidmaas.db.migrate import upgrade_sync

    upgrade_sync(settings.database.url)
    print("database is at the newest revision")
    return 0


@command("api")
def _api(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from vidmaas.api.app import create_app

    _configure_logging(settings)
    host = args.host or settings.api.host
    port = args.port or settings.api.port
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None,
                proxy_headers=True, ws_ping_interval=settings.api.stream_ping_interval_s)
    return 0


@command("dispatcher")
def _dispatcher(args: argparse.Namespace, settings: Settings) -> int:
    from vidmaas.roles import run_dispatcher

    _configure_logging(settings)
    asyncio.run(run_dispatcher(settings))
    return 0


@command("relay")
def _relay(args: argparse.Namespace, settings: Settings) -> int:
    from vidmaas.roles import run_relay

    _configure_logging(settings)
    asyncio.run(run_relay(settings))
    return 0


@command("up")
def _up(args: argparse.Namespace, settings: Settings) -> int:
    from vidmaas.embedded import run_up

    _configure_logging(settings)
    return run_up(data_dir=Path(args.data_dir or ".vidmaas"), host=args.host,
                  port=args.port, base=settings)


# ---------------------------------------------------------------- users

def _with_session(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(session)`` on a fresh engine that is disposed afterwards."""
    from vidmaas.db.engine import make_engine, make_sessionmaker

    async def run() -> T:
        engine = make_engine(settings.database)
        try:
            async with make_sessionmaker(engine)() as s:
                return await work(s)
        finally:
            await engine.dispose()

    return asyncio.run(run())


class LocalUsers:
    """The ``users`` commands on a database directly, answering in the admin API's
    shapes (``client.users_cli.UsersBackend``); a new weight or GPU quota is also put
    into the queue when its Redis answers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _user(self, user: Any) -> dict[str, Any]:
        from vidmaas.api.admin_schemas import user_out

        return user_out(user, self.settings).model_dump(mode="json")

    def _share(self, user: Any) -> None:
        from vidmaas.bus.client import connect
        from vidmaas.bus.queue import TaskQueue
        from vidmaas.db.users import share_of

        async def put() -> None:
            redis = connect(self.settings.redis.url)
            try:
                await TaskQueue(redis).set_share(user.id, share_of(user, self.settings.quotas))
            finally:
                await redis.aclose()

        try:
            asyncio.run(put())
        except Exception as e:
            print(f"vidmaas: the queue did not take the new share ({type(e).__name__}); it "
                  "applies from the user's next task", file=sys.stderr)

    def create_user(self, name: str, *, is_admin: bool, fields: Mapping[str, Any],
                    key: bool) -> dict[str, Any]:
        from vidmaas.api.admin_schemas import key_created
        from vidmaas.db import users

        checked = users.check_changes({"name": name, **fields})
        q = self.settings.quotas
        weight, top = checked.get("weight"), checked.get("max_priority")

        async def work(s: Any) -> tuple[Any, dict[str, Any] | None]:
            user = await users.create_user(
                session=s, name=checked["name"], is_admin=is_admin,
                weight=q.weight if weight is None else weight,
                max_priority=q.max_priority if top is None else top,
                quotas={k: v for k, v in checked.items() if k.startswith("quota_")})
            if not key:
                return user, None
            row, secret = await users.create_api_key(session=s, user_id=user.id)
            return user, key_created(row, secret).model_dump(mode="json")

        user, made = _with_session(self.settings, work)
        if checked.keys() & {"weight", "quota_gpus_at_once"}:
            self._share(user)
        return {"user": self._user(user), "key": made}

    def list_users(self) -> list[dict[str, Any]]:
        from vidmaas.db import users

        async def work(s: Any) -> list[Any]:
            return await users.list_users(session=s)

        return [self._user(u) for u in _with_session(self.settings, work)]

    def find_user(self, ref: str) -> dict[str, Any]:
        from vidmaas.db import users
        from vidmaas.errors import NotFound

        async def work(s: Any) -> Any:
            return await users.get_user_by_name(session=s, name=ref) \
                or await users.get_user(session=s, user_id=ref)

        found = _with_session(self.settings, work)
        if found is None:
            raise NotFound(f"no user {ref!r}", code="user_not_found")
        return self._user(found)

    def update_user(self, user_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        from vidmaas.db import users

        checked = users.check_changes(changes)

        async def work(s: Any) -> Any:
            return await users.update_user(session=s, user_id=user_id, changes=checked,
                                           defaults=self.settings.quotas)

        user = _with_session(self.settings, work)
        if checked.keys() & {"weight", "quota_gpus_at_once"}:
            self._share(user)
        return self._user(user)

    def set_disabled(self, user_id: str, *, disabled: bool) -> dict[str, Any]:
        from vidmaas.db import users

        async def work(s: Any) -> Any:
            return await users.set_disabled(session=s, user_id=user_id, disabled=disabled)

        return self._user(_with_session(self.settings, work))

    def create_key(self, user_id: str, *, name: str | None,
                   expires_in_s: float | None) -> dict[str, Any]:
        from datetime import timedelta

        from vidmaas.api.admin_schemas import key_created
        from vidmaas.db import users
        from vidmaas.db.models import utcnow
        from vidmaas.errors import InvalidRequest

        if expires_in_s is not None and expires_in_s <= 0:
            raise InvalidRequest("expires_in_s must be positive", code="invalid_expiry",
                                 field="expires_in_s")
        expires_at = None if expires_in_s is None else utcnow() + timedelta(
            seconds=expires_in_s)

        async def work(s: Any) -> dict[str, Any]:
            row, secret = await users.create_api_key(session=s, user_id=user_id, name=name,
                                                     expires_at=expires_at)
            return key_created(row, secret).model_dump(mode="json")

        return _with_session(self.settings, work)

    def list_keys(self, user_id: str) -> list[dict[str, Any]]:
        from vidmaas.api.admin_schemas import key_out
        from vidmaas.db import users

        async def work(s: Any) -> list[Any]:
            return await users.list_keys(session=s, user_id=user_id)

        return [key_out(k).model_dump(mode="json") for k in _with_session(self.settings, work)]

    def revoke_key(self, key_id: int) -> dict[str, Any]:
        from vidmaas.api.admin_schemas import key_out
        from vidmaas.db import users

        async def work(s: Any) -> Any:
            return await users.revoke_key(session=s, key_id=key_id)

        return key_out(_with_session(self.settings, work)).model_dump(mode="json")


def _local_users(args: argparse.Namespace) -> LocalUsers:
    return LocalUsers(_settings_for(args, Settings()))


# ---------------------------------------------------------------- models and manifests

@command("models list")
def _models_list(args: argparse.Namespace, settings: Settings) -> int:
    from vidmaas.domain.models import ModelRegistry

    for m in ModelRegistry.load(settings.models_path).values():
        print(f"{m.id}\t{m.pipeline}\t{m.gpus_per_job} GPU(s)\t{', '.join(m.sizes)}")
    return 0


@command("models plan")
def _models_plan(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from vidmaas.domain.models import ModelRegistry

    registry = ModelRegistry.load(settings.models_path)
    try:
        from vidmaas.runtime.plan import format_plans, plan_registry

        plans = plan_registry(registry.values())
    except ModuleNotFoundError as e:
        print(f"vidmaas models plan needs the runtime extra (torch, diffusers, transformers, "
              f"accelerate): {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"model": d.model, "default": d.as_dict(),
                           "memory_saving": m.as_dict()} for d, m in plans], indent=2))
    else:
        print(format_plans(plans), end="")
    unfit = [d.model for d, m in plans if d.fits is False or m.fits_pod is False]
    if unfit:
        print(f"vidmaas: plan_does_not_fit: {', '.join(unfit)} need more memory than "
              "declared (gpu_memory_gib, pod_memory_gib)", file=sys.stderr)
        return 1
    return 0


@command("models make-tiny")
def _models_make_tiny(args: argparse.Namespace, settings: Settings) -> int:
    from vidmaas.runtime.tiny import make_tiny

    make_tiny(Path(args.dir), args.layout)
    print(f"wrote a tiny {args.layout} checkpoint to {args.dir}")
    return 0


@command("render-job")
def _render_job(args: argparse.Namespace, settings: Settings) -> int:
    from vidmaas.dispatcher.executors.kubernetes import render_job_for_cli

    print(render_job_for_cli(settings=settings, model_id=args.model, prompt=args.prompt,
                             size=args.size, image_key=args.image_key, task_id=args.task_id,
                             num_frames=args.num_frames, steps=args.steps, seed=args.seed),
          end="")
    return 0


@command("render-pool")
def _render_pool(args: argparse.Namespace, settings: Settings) -> int:
    from vidmaas.dispatcher.executors.kubernetes import render_pool_for_cli

    print(render_pool_for_cli(settings=settings, model_id=args.model, worker_id=args.worker_id),
          end="")
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidmaas", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def data_dir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", help="work on the embedded instance in this directory")

    sp = sub.add_parser("up", help="run everything embedded (SQLite, Redis, local jobs)")
    sp.add_argument("--data-dir", default=None, help="data directory (default ./.vidmaas)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.set_defaults(key="up")

    sp = sub.add_parser("api", help="run the HTTP API")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    data_dir(sp)
    sp.set_defaults(key="api")
    for name, text in (("dispatcher", "run the dispatcher"), ("relay", "run the event relay"),
                       ("migrate", "migrate the database to the newest revision")):
        sp = sub.add_parser(name, help=text)
        data_dir(sp)
        sp.set_defaults(key=name)

    from vidmaas.client.users_cli import add_users_commands

    add_users_commands(sub, local=_local_users)

    models = sub.add_parser("models", help="the model registry").add_subparsers(
        dest="models_cmd", required=True)
    models.add_parser("list", help="list models").set_defaults(key="models list")
    sp = models.add_parser(
        "plan", help="per model: peak GPU and host memory per rank under its strategy, "
                     "and whether they fit what it declares")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(key="models plan")
    sp = models.add_parser("make-tiny", help="write a tiny random-weight checkpoint")
    sp.add_argument("dir")
    sp.add_argument("--layout", choices=["t2v", "ti2v", "a14b", "a14b-i2v"], default="t2v")
    sp.set_defaults(key="models make-tiny")

    sp = sub.add_parser("render-job", help="print the PyTorchJob manifest for a task")
    sp.add_argument("--model", required=True)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--size", required=True)
    sp.add_argument("--image-key")
    sp.add_argument("--task-id")
    sp.add_argument("--num-frames", type=int)
    sp.add_argument("--steps", type=int)
    sp.add_argument("--seed", type=int)
    sp.set_defaults(key="render-job")
    sp = sub.add_parser("render-pool",
                        help="print the LeaderWorkerSet of a new warm-pool worker of a model")
    sp.add_argument("--model", required=True)
    sp.add_argument("--worker-id", help="the worker id (default: a fresh one)")
    sp.set_defaults(key="render-pool")

    try:
        from vidmaas.client.cli import add_client_commands
    except ModuleNotFoundError as e:
        if e.name not in ("vidmaas.client", "vidmaas.client.cli"):
            raise
    else:
        add_client_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "run"):
            return int(args.run(args))
        settings = _settings_for(args, Settings())
        return _COMMANDS[args.key](args, settings)
    except VidmaasError as e:
        print(f"vidmaas: {e.code}: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
