"""Where the CLI finds its server URL and API key.

Guarantees: each value is taken from the first source that has it, in this order:
the command-line flag, the environment (``VIDMAAS_SERVER``, ``VIDMAAS_API_KEY``), the
config file (``--config``, else ``VIDMAAS_CONFIG``, else
``$XDG_CONFIG_HOME/vidmaas/config.toml``, else ``~/.config/vidmaas/config.toml``) with
top-level ``server`` and ``api_key`` strings; the server defaults to
``http://127.0.0.1:8000`` (what ``vidmaas up`` serves). A config file that exists but
cannot be read or parsed is an error, never silently ignored. Nothing is read until
``resolve`` is called.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:8000"


class ConfigError(Exception):
    """The configuration cannot be used; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    server: str
    api_key: str | None
    source_of_key: str | None
    """Where the key came from (flag, env, the file's path), for error messages."""


def default_config_path(env: Mapping[str, str]) -> Path:
    if env.get("VIDMAAS_CONFIG"):
        return Path(env["VIDMAAS_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(base) / "vidmaas" / "config.toml"


def read_file(path: Path) -> dict[str, str]:
    """``server`` / ``api_key`` from a TOML file; {} if the file does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    out: dict[str, str] = {}
    for key in ("server", "api_key"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {key} must be a string")
        out[key] = value
    return out


def resolve(*, server: str | None, api_key: str | None, config_path: str | None,
            env: Mapping[str, str] | None = None) -> ClientConfig:
    """Merge flags over the environment over the config file."""
    env = os.environ if env is None else env
    path = Path(config_path).expanduser() if config_path else default_config_path(env)
    if config_path and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    file = read_file(path)
    key, source = None, None
    for value, where in ((api_key, "--api-key"), (env.get("VIDMAAS_API_KEY"), "VIDMAAS_API_KEY"),
                         (file.get("api_key"), str(path))):
        if value:
            key, source = value, where
            break
    url = server or env.get("VIDMAAS_SERVER") or file.get("server") or DEFAULT_SERVER
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"the server URL must start with http:// or https:// (got {url!r})")
    return ClientConfig(server=url.rstrip("/"), api_key=key, source_of_key=source)
