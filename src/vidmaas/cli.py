"""The ``vidmaas`` command: run roles, manage users, inspect models and manifests.

Guarantees: settings come from the environment (``VIDMAAS_*``) once, in ``main``;
``--data-dir`` points any database command at an embedded instance (its SQLite file
and object directory) instead; every command exits non-zero with a one-line message
on a vidmaas error; ``users create`` prints the new API key as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
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


@command("users create")
def _users_create(args: argparse.Namespace, settings: Settings) -> int:
    from vidmaas.db import users

    async def work(s: Any) -> str:
        user = await users.create_user(session=s, name=args.name, is_admin=args.admin)
        return await users.create_key(session=s, user_id=user.id)

    key = _with_session(settings, work)
    print(f"created {'admin ' if args.admin else ''}user {args.name}; API key (shown once):")
    print(key)
    return 0


@command("users key")
def _users_key(args: argparse.Namespace, settings: Settings) -> int:
    from vidmaas.db import users
    from vidmaas.errors import NotFound

    async def work(s: Any) -> str:
        user = await users.get_user_by_name(session=s, name=args.name)
        if user is None:
            raise NotFound(f"no user {args.name!r}")
        if args.revoke_others:
            await users.revoke_keys(session=s, user_id=user.id)
        return await users.create_key(session=s, user_id=user.id)

    key = _with_session(settings, work)
    print(f"new API key for {args.name} (shown once):")
    print(key)
    return 0


@command("users list")
def _users_list(args: argparse.Namespace, settings: Settings) -> int:
    from vidmaas.db import users

    async def work(s: Any) -> list[Any]:
        return await users.list_users(session=s)

    for u in _with_session(settings, work):
        print(f"{u.name}\t{'admin' if u.is_admin else 'user'}\t{u.id}")
    return 0


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

    users = sub.add_parser("users", help="manage users and API keys").add_subparsers(
        dest="users_cmd", required=True)
    sp = users.add_parser("create", help="create a user and print a new API key")
    sp.add_argument("name")
    sp.add_argument("--admin", action="store_true", help="the user sees every task")
    data_dir(sp)
    sp.set_defaults(key="users create")
    sp = users.add_parser("key", help="issue a new API key for a user")
    sp.add_argument("name")
    sp.add_argument("--revoke-others", action="store_true")
    data_dir(sp)
    sp.set_defaults(key="users key")
    sp = users.add_parser("list", help="list users")
    data_dir(sp)
    sp.set_defaults(key="users list")

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
