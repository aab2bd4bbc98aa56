"""``vidmaas submit | watch | tasks | cancel``: the command-line client.

Guarantees:
- ``add_client_commands(sub)`` adds the four subcommands to the ``vidmaas`` parser;
  each sets ``run`` to a callable returning the exit code. Nothing happens at import.
- The server URL and key come from ``--server``/``--api-key``, else the environment,
  else the config file (see ``vidmaas.client.config``).
- Exit codes: 0 success; 1 for a missing key, an error from the server (printed as
  ``vidmaas: <code>: <message>``, naming the field when the server names one), or a
  watched task that failed or was cancelled; 130 on Ctrl-C (the task keeps running).
- Live progress (status, queue position, stage, percent, ETA) goes to stderr; the
  results a script wants (task id, file path, tables) go to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from vidmaas.client.config import ConfigError, resolve
from vidmaas.client.sync import Client
from vidmaas.client.wire import ClientError, Message, is_terminal, snapshot_state

STAGE_NAMES = {
    "fetch_input": "fetching input", "load_model": "loading model",
    "encode_prompt": "encoding prompt", "denoise": "denoising", "decode": "decoding",
    "postprocess": "postprocessing", "upload": "uploading",
}


def _common(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("connection")
    g.add_argument("--server", help="server URL (env VIDMAAS_SERVER; default "
                                    "http://127.0.0.1:8000)")
    g.add_argument("--api-key", help="API key (env VIDMAAS_API_KEY)")
    g.add_argument("--config", help="config file (default ~/.config/vidmaas/config.toml)")


def add_client_commands(sub: Any) -> None:
    """Add ``submit``, ``watch``, ``tasks`` and ``cancel`` to the ``vidmaas`` subparsers."""
    sp = sub.add_parser("submit", help="submit a video generation task")
    sp.add_argument("--prompt", required=True, help="what the video should show")
    sp.add_argument("--image", type=Path, help="input image (PNG, JPEG, WebP)")
    sp.add_argument("--model", help="model id (see GET /v1/models); default: the server's")
    sp.add_argument("--size", help="W*H, one of the model's sizes")
    sp.add_argument("--num-frames", type=int, help="frame count, one of the model's")
    sp.add_argument("--steps", type=int, help="denoising steps")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--negative-prompt")
    sp.add_argument("--idempotency-key", help="a retried submit with the same key "
                                              "returns the same task")
    sp.add_argument("--wait", action="store_true",
                    help="show live progress and download the video when done")
    sp.add_argument("--output", "-o", type=Path,
                    help="where to save the video with --wait (default ./<task id>.mp4)")
    sp.add_argument("--json", action="store_true", help="print the task as JSON")
    _common(sp)
    sp.set_defaults(run=_runner(cmd_submit))

    sp = sub.add_parser("watch", help="follow a task's progress live")
    sp.add_argument("task_id")
    sp.add_argument("--output", "-o", type=Path, help="download the video here when done")
    _common(sp)
    sp.set_defaults(run=_runner(cmd_watch))

    sp = sub.add_parser("tasks", help="list your tasks, newest first")
    sp.add_argument("--limit", type=int, default=20)
    sp.add_argument("--status", action="append",
                    choices=["queued", "dispatching", "running", "cancelling", "completed",
                             "failed", "cancelled"], help="only these statuses (repeatable)")
    sp.add_argument("--json", action="store_true", help="print the page as JSON")
    _common(sp)
    sp.set_defaults(run=_runner(cmd_tasks))

    sp = sub.add_parser("cancel", help="cancel a task")
    sp.add_argument("task_id")
    _common(sp)
    sp.set_defaults(run=_runner(cmd_cancel))


def say(console: Console, text: str) -> None:
    """One plain line (no markup, never wrapped, so scripts and tests can match it)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


Command = Callable[[argparse.Namespace, Client, Console], int]


def _runner(cmd: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        err = Console(stderr=True, highlight=False)
        try:
            cfg = resolve(server=args.server, api_key=args.api_key, config_path=args.config)
        except ConfigError as e:
            say(err, f"vidmaas: {e}")
            return 1
        if not cfg.api_key:
            say(err, "vidmaas: no API key: pass --api-key KEY, set VIDMAAS_API_KEY, or put "
                      "api_key = \"...\" in ~/.config/vidmaas/config.toml")
            return 1
        try:
            with Client(cfg.server, cfg.api_key) as client:
                return cmd(args, client, err)
        except ClientError as e:
            where = f" (field {e.field})" if e.field else ""
            say(err, f"vidmaas: {e.code}: {e.message}{where}")
            return 1
        except KeyboardInterrupt:
            return 130
    return run


# ---------------------------------------------------------------- commands

def cmd_submit(args: argparse.Namespace, client: Client, err: Console) -> int:
    task = client.submit(args.prompt, model=args.model, size=args.size,
                         num_frames=args.num_frames, steps=args.steps, seed=args.seed,
                         negative_prompt=args.negative_prompt, image=args.image,
                         idempotency_key=args.idempotency_key)
    if args.json and not args.wait:
        print(json.dumps(task, indent=2))
        return 0
    print(task["id"])
    if not args.wait:
        return 0
    output = args.output or Path(f"{task['id']}.mp4")
    return follow(client, task["id"], output=output, err=err)


def cmd_watch(args: argparse.Namespace, client: Client, err: Console) -> int:
    return follow(client, args.task_id, output=args.output, err=err)


def cmd_tasks(args: argparse.Namespace, client: Client, err: Console) -> int:
    page = client.list(limit=args.limit, status=args.status)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    out = Console(highlight=False)
    if not page["data"]:
        out.print("no tasks")
        return 0
    rows = []
    for t in page["data"]:
        status = t["status"]
        if status == "queued" and t.get("queue_position"):
            status += f" #{t['queue_position']}"
        prompt = t["prompt"].replace("\n", " ")
        rows.append((t["id"], status, f"{t['progress']:.0f}%", t["model"],
                     t["created_at"][:19].replace("T", " "),
                     prompt[:60] + ("…" if len(prompt) > 60 else "")))
    if not out.is_terminal:  # a pipe: one tab-separated line per task
        for row in rows:
            print("\t".join(row))
    else:
        table = Table(box=None, pad_edge=False)
        for col in ("ID", "STATUS", "PROGRESS", "MODEL", "CREATED", "PROMPT"):
            table.add_column(col, no_wrap=col != "PROMPT", overflow="ellipsis")
        for row in rows:
            table.add_row(*row)
        out.print(table)
    if page.get("next_cursor"):
        out.print(f"(more: --limit {args.limit * 2})")
    return 0


def cmd_cancel(args: argparse.Namespace, client: Client, err: Console) -> int:
    task = client.cancel(args.task_id)
    print(f"{task['id']} {task['status']}")
    return 0


# ---------------------------------------------------------------- live progress

@dataclass
class TaskView:
    """What the progress line shows, folded from stream messages."""

    status: str = "queued"
    percent: float = 0.0
    stage: str | None = None
    eta_s: float | None = None
    position: int | None = None
    error: str | None = None

    def apply(self, msg: Message) -> None:
        kind = msg.get("type")
        data: dict[str, Any] = msg.get("data") or {}
        if kind == "snapshot":
            t = snapshot_state(msg)
            self.status = str(t.get("status", self.status))
            self.percent = max(self.percent, float(t.get("progress") or 0))
            self.stage = t.get("stage") or self.stage
            self.eta_s = t.get("eta_s")
            self.position = t.get("queue_position")
            if t.get("error"):
                self.error = f"{t['error']['code']}: {t['error']['message']}"
        elif kind == "queued":
            self.status, self.position = "queued", data.get("position")
            self.percent, self.stage, self.eta_s = 0.0, None, None
        elif kind == "dispatched":
            self.status, self.position = "dispatching", None
        elif kind == "started":
            self.status = "running"
        elif kind == "stage":
            self.stage = data.get("stage")
        elif kind == "progress":
            self.status = "running" if self.status in ("queued", "dispatching") else self.status
            self.percent = max(self.percent, float(data.get("percent") or 0))
            self.eta_s = data.get("eta_s")
            self.stage = data.get("stage") or self.stage
        elif kind == "status":
            self.status = str(data.get("status", self.status))
        elif kind == "completed":
            self.status, self.percent, self.eta_s = "completed", 100.0, None
        elif kind == "failed":
            self.error = f"{data.get('code')}: {data.get('message')}"
            if not data.get("retryable"):
                self.status = "failed"
        elif kind == "cancelled":
            self.status = "cancelled"

    def describe(self) -> str:
        if self.status == "queued":
            return f"queued #{self.position}" if self.position else "queued"
        if self.status == "running" and self.stage:
            return STAGE_NAMES.get(self.stage, self.stage)
        return self.status

    def eta_text(self) -> str:
        if self.eta_s is None or self.status != "running":
            return ""
        s = round(self.eta_s)
        return f"ETA {s // 60}:{s % 60:02d}"


def follow(client: Client, task_id: str, *, output: Path | None, err: Console) -> int:
    """Show a task's progress until it ends; download the video if asked. Exit code."""
    view = TaskView()
    progress = Progress(TextColumn("[bold]{task.description:<16}"), BarColumn(),
                        TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[eta]}"),
                        console=err, transient=False)
    shown: tuple[str, str | None] | None = None
    try:
        with progress:
            bar: TaskID = progress.add_task(view.describe(), total=100, eta="")
            for msg in client.watch(task_id):
                view.apply(msg)
                progress.update(bar, completed=view.percent, description=view.describe(),
                                eta=view.eta_text())
                if (view.status, view.stage) != shown:
                    shown = (view.status, view.stage)
                    if not err.is_terminal:
                        say(err, f"{task_id} {view.describe()} {view.percent:.0f}%")
                if is_terminal(msg):
                    break
    except KeyboardInterrupt:
        say(err, f"stopped watching; the task goes on: vidmaas watch {task_id}")
        return 130
    # The stream can announce the end before the server has recorded it: the row decides.
    task = client.wait(task_id)
    view.status = task["status"]
    if view.status != "completed":
        if task["status"] == "failed" and task.get("error"):
            view.error = f"{task['error']['code']}: {task['error']['message']}"
        reason = f": {view.error}" if view.error and task["status"] == "failed" else ""
        say(err, f"vidmaas: task {task_id} {task['status']}{reason}")
        return 1
    if output is not None:
        path = client.download(task_id, output)
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the client commands alone (``python -m vidmaas.client.cli``)."""
    parser = argparse.ArgumentParser(prog="vidmaas")
    add_client_commands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
