"""How ``preview`` events travel to a client whose outbox is full: like progress, only the
newest matters, and they never push out an event that must arrive."""

from __future__ import annotations

from vidmaas.api.streams.outbox import Outbox
from vidmaas.domain import events as ev
from vidmaas.domain.ids import new_task_id


def _preview(task_id: str, step: int) -> ev.Event:
    return ev.preview(task_id, key=f"outputs/{task_id}/preview.jpg", step=step, total=40,
                      width=256, height=144)


def test_a_full_outbox_keeps_the_newest_preview_and_every_state_event() -> None:
    task_id = new_task_id()
    box = Outbox(limit=8)
    box.put_event(task_id=task_id, event_id="1-0",
                  event=ev.started(task_id, world_size=1, host="h"))
    for step in range(1, 21):
        box.put_event(task_id=task_id, event_id=f"{step + 1}-0", event=_preview(task_id, step))
    box.put_event(task_id=task_id, event_id="99-0",
                  event=ev.cancelled(task_id, by="user"))
    sent = box.take()
    types = [m["type"] for m in sent]
    assert types[0] == "started" and types[-1] == "cancelled"
    steps = [m["data"]["step"] for m in sent if m["type"] == "preview"]
    assert 20 in steps, "the newest preview is never the one dropped"
    assert len(sent) <= 8 and not box.overflowed
