"""``vidmaas users …``: users and API keys, over a running server or on a database.

Guarantees:
- ``add_users_commands(sub, local=…)`` adds ``users create | list | show | update |
  disable | enable | key | keys create | keys list | keys revoke``; each sets ``run``.
- Where they act (``choose``): on the embedded instance's database with
  ``--data-dir``; over the admin API with ``--server`` or ``--api-key``; on the
  database of the settings when ``VIDMAAS_DATABASE_URL`` is set; over the API when a
  key is found in the environment or the config file (``client.config``: the same
  resolution as ``vidmaas submit``); on the settings' database otherwise. Both do
  the same things and print the same lines, because they answer in the API's shapes
  (``UsersBackend``).
- ``users create`` and ``users key`` / ``keys create`` print the new key's secret as
  their last line, the only time it is ever shown. ``update`` takes ``default`` for
  a value to reset it to the server's default.
- Exit codes: 0 success; 1 for any error (``vidmaas: <code>: <message>``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from vidmaas.client.config import ConfigError, resolve
from vidmaas.client.sync import Client
from vidmaas.client.wire import ClientError

QUOTA_FLAGS = (("queued_tasks", int), ("gpus_at_once", int), ("gpu_seconds_day", float),
               ("gpu_seconds_month", float))


class UsersBackend(Protocol):
    """The operations, answering in the admin API's JSON shapes."""

    def create_user(self, name: str, *, is_admin: bool, fields: Mapping[str, Any],
                    key: bool) -> dict[str, Any]: ...
    def list_users(self) -> list[dict[str, Any]]: ...
    def find_user(self, ref: str) -> dict[str, Any]: ...
    def update_user(self, user_id: str, changes: Mapping[str, Any]) -> dict[str, Any]: ...
    def set_disabled(self, user_id: str, *, disabled: bool) -> dict[str, Any]: ...
    def create_key(self, user_id: str, *, name: str | None,
                   expires_in_s: float | None) -> dict[str, Any]: ...
    def list_keys(self, user_id: str) -> list[dict[str, Any]]: ...
    def revoke_key(self, key_id: int) -> dict[str, Any]: ...


class RemoteUsers:
    """The operations over the admin API of a running server."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def create_user(self, name: str, *, is_admin: bool, fields: Mapping[str, Any],
                    key: bool) -> dict[str, Any]:
        quotas = {k.removeprefix("quota_"): v for k, v in fields.items()
                  if k.startswith("quota_")}
        return self.client.create_user(name, is_admin=is_admin, weight=fields.get("weight"),
                                       max_priority=fields.get("max_priority"),
                                       quotas=quotas, key=key)

    def list_users(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.client.list_users(limit=200, cursor=cursor)
            out += page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    def find_user(self, ref: str) -> dict[str, Any]:
        found = self.client.list_users(limit=1, name=ref)["data"]
        if found:
            return dict(found[0])
        try:
            return self.client.get_user(ref)
        except ClientError as e:
            if e.status == 404:
                raise ClientError(404, "user_not_found", f"no user {ref!r}") from e
            raise

    def update_user(self, user_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        return self.client.update_user(user_id, changes)

    def set_disabled(self, user_id: str, *, disabled: bool) -> dict[str, Any]:
        return (self.client.disable_user if disabled else self.client.enable_user)(user_id)

    def create_key(self, user_id: str, *, name: str | None,
                   expires_in_s: float | None) -> dict[str, Any]:
        return self.client.create_key(user_id, name=name, expires_in_s=expires_in_s)

    def list_keys(self, user_id: str) -> list[dict[str, Any]]:
        return list(self.client.list_keys(user_id)["data"])

    def revoke_key(self, key_id: int) -> dict[str, Any]:
        return self.client.revoke_key(key_id)


LocalFactory = Callable[[argparse.Namespace], UsersBackend]


def choose(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> str:
    """``local`` or ``remote``, by the rule in the module docstring."""
    env = os.environ if env is None else env
    if getattr(args, "data_dir", None):
        return "local"
    if args.server or args.api_key:
        return "remote"
    if env.get("VIDMAAS_DATABASE_URL"):
        return "local"
    cfg = resolve(server=None, api_key=None, config_path=args.config, env=env)
    return "remote" if cfg.api_key else "local"


def _connection(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("where (see `vidmaas users --help`)")
    g.add_argument("--data-dir", help="the embedded instance in this directory")
    g.add_argument("--server", help="a running server (env VIDMAAS_SERVER)")
    g.add_argument("--api-key", help="an admin's API key (env VIDMAAS_API_KEY)")
    g.add_argument("--config", help="client config file (default "
                                    "~/.config/vidmaas/config.toml)")


def _value(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text == "default" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _settable(sp: argparse.ArgumentParser, *, update: bool) -> None:
    """The weight, priority and quota flags; for ``update`` an absent flag sets nothing
    (``SUPPRESS``) and ``default`` stands for a reset."""
    what = " (or 'default')" if update else ""
    extra: dict[str, Any] = {"default": argparse.SUPPRESS} if update else {}
    sp.add_argument("--weight", type=_value(float) if update else float,
                    help=f"fairness weight, 0.01–100{what}", **extra)
    sp.add_argument("--max-priority", type=_value(str) if update else str,
                    help=f"highest priority class: low, normal, high{what}", **extra)
    for name, kind in QUOTA_FLAGS:
        sp.add_argument(f"--{name.replace('_', '-')}", dest=f"quota_{name}",
                        type=_value(kind) if update else kind,
                        help=f"quota: {name.replace('_', ' ')}{what}", **extra)


def add_users_commands(sub: Any, *, local: LocalFactory) -> None:
    """Add the ``users`` commands to the ``vidmaas`` subparsers."""
    users = sub.add_parser("users", help="manage users and API keys (admin)",
                           description=__doc__.split("\n\n")[1] if __doc__ else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = users.add_subparsers(dest="users_cmd", required=True)

    def add(name: str, fn: Callable[..., int], helptext: str,
            parent: Any = cmds) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=helptext)
        _connection(sp)
        sp.set_defaults(run=_runner(fn, local))
        return sp

    sp = add("create", cmd_create, "create a user and print a new API key")
    sp.add_argument("name")
    sp.add_argument("--admin", action="store_true", help="the user sees every task")
    sp.add_argument("--no-key", action="store_true", help="make no key now")
    _settable(sp, update=False)
    sp = add("list", cmd_list, "list users")
    sp.add_argument("--json", action="store_true")
    sp = add("show", cmd_show, "a user's settings, quotas and keys")
    sp.add_argument("user", help="name or id")
    sp.add_argument("--json", action="store_true")
    sp = add("update", cmd_update, "change a user's name, role, weight, priority, quotas")
    sp.add_argument("user", help="name or id")
    sp.add_argument("--name", dest="new_name")
    role = sp.add_mutually_exclusive_group()
    role.add_argument("--admin", dest="is_admin", action="store_true", default=None)
    role.add_argument("--no-admin", dest="is_admin", action="store_false")
    _settable(sp, update=True)
    for name, helptext in (("disable", "disable a user (their keys stop working)"),
                           ("enable", "enable a disabled user")):
        sp = add(name, cmd_disable if name == "disable" else cmd_enable, helptext)
        sp.add_argument("user", help="name or id")
    sp = add("key", cmd_key, "issue a new API key for a user")
    sp.add_argument("user", help="name or id")
    sp.add_argument("--revoke-others", action="store_true")
    keys = cmds.add_parser("keys", help="a user's API keys").add_subparsers(
        dest="keys_cmd", required=True)
    sp = add("create", cmd_keys_create, "a new key (printed once)", keys)
    sp.add_argument("user", help="name or id")
    sp.add_argument("--name", dest="key_name")
    sp.add_argument("--expires-in-s", type=float, help="valid for this many seconds")
    sp = add("list", cmd_keys_list, "list a user's keys", keys)
    sp.add_argument("user", help="name or id")
    sp.add_argument("--json", action="store_true")
    sp = add("revoke", cmd_keys_revoke, "revoke a key by its id", keys)
    sp.add_argument("key_id", type=int)


def _runner(fn: Callable[[argparse.Namespace, UsersBackend], int],
            local: LocalFactory) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from vidmaas.errors import VidmaasError

        try:
            if choose(args) == "local":
                return fn(args, local(args))
            cfg = resolve(server=args.server, api_key=args.api_key, config_path=args.config)
            if not cfg.api_key:
                print("vidmaas: no API key: pass --api-key KEY of an admin, set "
                      "VIDMAAS_API_KEY, or use --data-dir", file=sys.stderr)
                return 1
            with Client(cfg.server, cfg.api_key) as client:
                return fn(args, RemoteUsers(client))
        except ConfigError as e:
            print(f"vidmaas: {e}", file=sys.stderr)
        except ClientError as e:
            where = f" (field {e.field})" if e.field else ""
            print(f"vidmaas: {e.code}: {e.message}{where}", file=sys.stderr)
        except VidmaasError as e:
            where = f" (field {e.field})" if e.field else ""
            print(f"vidmaas: {e.code}: {e.message}{where}", file=sys.stderr)
        return 1
    return run


# ---------------------------------------------------------------- commands

def _fields(args: argparse.Namespace, *, update: bool) -> dict[str, Any]:
    """The weight, priority and quotas given (for ``update``, None resets one)."""
    names = ["weight", "max_priority", *(f"quota_{q}" for q, _ in QUOTA_FLAGS)]
    given = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return given if update else {n: v for n, v in given.items() if v is not None}


def _line(u: Mapping[str, Any]) -> str:
    role = "admin" if u["is_admin"] else "user"
    state = "disabled" if u["disabled"] else "active"
    return f"{u['name']}\t{role}\t{u['id']}\tweight {u['weight']:g}\t" \
           f"max {u['max_priority']}\t{state}"


def _quota_text(value: float | int | None) -> str:
    return "no limit" if value is None else f"{value:g}"


def cmd_create(args: argparse.Namespace, b: UsersBackend) -> int:
    made = b.create_user(args.name, is_admin=args.admin, fields=_fields(args, update=False),
                         key=not args.no_key)
    who = f"{'admin ' if args.admin else ''}user {args.name}"
    if made.get("key"):
        print(f"created {who} ({made['user']['id']}); API key (shown once):")
        print(made["key"]["secret"])
    else:
        print(f"created {who} ({made['user']['id']})")
    return 0


def cmd_list(args: argparse.Namespace, b: UsersBackend) -> int:
    found = sorted(b.list_users(), key=lambda u: u["name"])
    if args.json:
        print(json.dumps(found, indent=2))
    for u in [] if args.json else found:
        print(_line(u))
    return 0


def cmd_show(args: argparse.Namespace, b: UsersBackend) -> int:
    user = b.find_user(args.user)
    keys = b.list_keys(user["id"])
    if args.json:
        print(json.dumps({"user": user, "keys": keys}, indent=2))
        return 0
    print(_line(user))
    for q, _ in QUOTA_FLAGS:
        own = user["quotas"][q]
        print(f"  {q:<18} {_quota_text(user['limits'][q])}"
              f"{'' if own is not None else ' (default)'}")
    for k in keys:
        print("  " + _key_line(k))
    return 0


def cmd_update(args: argparse.Namespace, b: UsersBackend) -> int:
    user = b.find_user(args.user)
    changes = _fields(args, update=True)
    if args.new_name is not None:
        changes["name"] = args.new_name
    if args.is_admin is not None:
        changes["is_admin"] = args.is_admin
    if not changes:
        print("vidmaas: nothing to change", file=sys.stderr)
        return 1
    print(_line(b.update_user(user["id"], changes)))
    return 0


def cmd_disable(args: argparse.Namespace, b: UsersBackend) -> int:
    print(_line(b.set_disabled(b.find_user(args.user)["id"], disabled=True)))
    return 0


def cmd_enable(args: argparse.Namespace, b: UsersBackend) -> int:
    print(_line(b.set_disabled(b.find_user(args.user)["id"], disabled=False)))
    return 0


def cmd_key(args: argparse.Namespace, b: UsersBackend) -> int:
    user = b.find_user(args.user)
    if args.revoke_others:
        for k in b.list_keys(user["id"]):
            if k["revoked_at"] is None:
                b.revoke_key(int(k["id"]))
    key = b.create_key(user["id"], name=None, expires_in_s=None)
    print(f"new API key for {user['name']} (shown once):")
    print(key["secret"])
    return 0


def _key_line(k: Mapping[str, Any]) -> str:
    state = "active" if k["active"] else ("revoked" if k["revoked_at"] else "expired")
    return "\t".join([str(k["id"]), f"{k['prefix']}…", k.get("name") or "-", state,
                      f"created {k['created_at'][:19]}",
                      f"last used {(k.get('last_used_at') or 'never')[:19]}",
                      f"expires {(k.get('expires_at') or 'never')[:19]}"])


def cmd_keys_create(args: argparse.Namespace, b: UsersBackend) -> int:
    user = b.find_user(args.user)
    key = b.create_key(user["id"], name=args.key_name, expires_in_s=args.expires_in_s)
    print(f"new API key {key['id']} for {user['name']} (shown once):")
    print(key["secret"])
    return 0


def cmd_keys_list(args: argparse.Namespace, b: UsersBackend) -> int:
    keys = b.list_keys(b.find_user(args.user)["id"])
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    for k in keys:
        print(_key_line(k))
    return 0


def cmd_keys_revoke(args: argparse.Namespace, b: UsersBackend) -> int:
    key = b.revoke_key(args.key_id)
    print(f"revoked key {key['id']} ({key['prefix']}…)")
    return 0
