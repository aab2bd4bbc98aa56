"""The v1 event wire format."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vidmaas.domain import events as ev
from vidmaas.domain.ids import new_task_id
from vidmaas.domain.status import TaskStatus

TID = new_task_id()


def test_every_constructor_round_trips_through_the_wire_format() -> None:
    samples = [
        ev.queued(TID, position=3),
        ev.dispatched(TID, executor="local", job_name="wan22-job-x", attempt=1),
        ev.started(TID, world_size=2, host="node-1"),
        ev.stage(TID, ev.Stage.DENOISE),
        ev.progress(TID, step=2, total=4, percent=55.5, eta_s=3.2),
        ev.heartbeat(TID),
        ev.log(TID, level="info", message="hello"),
        ev.failed(TID, code="oom", message="out of memory", retryable=True),
        ev.cancelled(TID, by="alice"),
    ]
    for e in samples:
        assert ev.decode(ev.encode(e)) == e


@pytest.mark.parametrize("fields", [
    {},
    {"v": "1", "task_id": TID, "type": "progress", "data": "{not json"},
    {"v": "2", "task_id": TID, "type": "heartbeat", "data": "{}"},
    {"v": "1", "task_id": "../etc", "type": "heartbeat", "data": "{}"},
    {"v": "1", "task_id": TID, "type": "teleported", "data": "{}"},
    {"v": "1", "task_id": TID, "type": "progress", "data": json.dumps({"step": 1})},
    {"v": "1", "task_id": TID, "type": "progress",
     "data": json.dumps({"step": 1, "total": 2, "percent": 140})},
    {"v": "1", "task_id": TID, "type": "stage", "data": json.dumps({"stage": "dance"})},
    {"v": "1", "task_id": TID, "type": "heartbeat", "data": "[]"},
    {"v": "1", "task_id": TID, "type": "failed",
     "data": json.dumps({"code": "x", "message": "y", "retryable": "yes"})},
])
def test_malformed_fields_raise_malformed_event(fields: dict[str, str]) -> None:
    with pytest.raises(ev.MalformedEvent):
        ev.decode(fields)


@given(st.dictionaries(st.sampled_from(["v", "task_id", "type", "data", "x"]),
                       st.one_of(st.text(max_size=40), st.binary(max_size=40))))
def test_the_decoder_either_returns_a_valid_event_or_raises_malformed_event(
        fields: dict[str, str | bytes]) -> None:
    try:
        e = ev.decode(fields)
    except ev.MalformedEvent:
        return
    assert ev.decode(ev.encode(e)) == e


# ------------------------------------------------------------------ client messages

def _state(status: TaskStatus, **kw: Any) -> ev.TaskState:
    return ev.TaskState(**{"task_id": TID, "status": status, "progress": 12.3456,
                           "stage": "denoise", "eta_s": 4.5, "attempts": 1, **kw})


def test_a_snapshot_has_the_documented_fields_and_its_id_is_the_resume_point() -> None:
    msg = ev.snapshot(_state(TaskStatus.RUNNING), resume_id="5-0", last_event_id="7-1",
                      queue_position=None)
    assert msg == {"v": 1, "type": "snapshot", "task_id": TID, "id": "5-0", "data": {
        "status": "running", "progress": 12.35, "stage": "denoise", "eta_s": 4.5,
        "queue_position": None, "last_event_id": "7-1", "attempts": 1, "error": None,
        "result": None}}
    assert json.loads(json.dumps(msg)) == msg
    assert type(msg["data"]["status"]) is str  # plain JSON, not the enum


def test_a_snapshot_shows_an_error_only_for_a_failed_task_or_one_queued_for_a_retry() -> None:
    err = {"error_code": "node_lost", "error_message": None}
    shown = {TaskStatus(s): ev.snapshot(_state(TaskStatus(s), **err), resume_id="0-0",
                                        last_event_id=None, queue_position=None)["data"]["error"]
             for s in TaskStatus}
    assert shown.pop(TaskStatus.FAILED) == {"code": "node_lost", "message": ""}
    assert shown.pop(TaskStatus.QUEUED) == {"code": "node_lost", "message": ""}
    assert set(shown.values()) == {None}
    assert ev.shown_error(status=TaskStatus.FAILED, code=None, message="x") is None


def test_a_snapshot_shows_the_result_only_once_the_task_completed() -> None:
    result = {"width": 64, "timings": {"total_s": 1.0}}
    done = ev.snapshot(_state(TaskStatus.COMPLETED, result=result), resume_id="1-0",
                       last_event_id="1-0", queue_position=None)
    assert done["data"]["result"] == result
    running = ev.snapshot(_state(TaskStatus.RUNNING, result=result), resume_id="1-0",
                          last_event_id="1-0", queue_position=None)
    assert running["data"]["result"] is None


def test_position_pushes_ends_and_pings_have_their_documented_shapes() -> None:
    assert ev.position_push(TID, position=3) == {
        "v": 1, "type": "queued", "task_id": TID, "data": {"position": 3}}
    assert "id" not in ev.position_push(TID, position=3)  # not an event: no resume point
    assert ev.end(TID) == {"v": 1, "type": "end", "task_id": TID, "data": {}}
    assert ev.ping() == {"type": "ping"}


def test_not_found_and_the_clients_resume_request_have_their_documented_shapes() -> None:
    assert ev.not_found(TID) == {"v": 1, "type": "not_found", "task_id": TID, "data": {}}
    assert ev.resume_request({TID: "5-0"}) == {"type": "resume", "after": {TID: "5-0"}}


_DONE = {"video_key": "outputs/t/video.mp4", "poster_key": "outputs/t/poster.jpg",
         "width": 64, "height": 64, "num_frames": 9, "fps": 8, "duration_s": 1.125, "seed": 1,
         "timings": {}}
_SPRITE = {"columns": 5, "rows": 2, "count": 9, "tile_width": 64, "tile_height": 64}


def test_completed_may_carry_a_spritesheet_and_results_without_one_stay_valid() -> None:
    tid = new_task_id()
    with_sheet = {**_DONE, "spritesheet_key": "outputs/t/spritesheet.jpg",
                  "spritesheet": _SPRITE}
    for data in (_DONE, with_sheet):
        event = ev.Event(tid, ev.EventType.COMPLETED, data)
        assert ev.decode(ev.encode(event)) == event
    assert ev.spritesheet_of(with_sheet) == ("outputs/t/spritesheet.jpg", _SPRITE)
    assert ev.spritesheet_of(_DONE) is None and ev.spritesheet_of(None) is None


@pytest.mark.parametrize("bad", [
    {"spritesheet_key": "outputs/t/spritesheet.jpg"},
    {"spritesheet": _SPRITE},
    {"spritesheet_key": "", "spritesheet": _SPRITE},
    {"spritesheet_key": "k", "spritesheet": {**_SPRITE, "rows": 0}},
    {"spritesheet_key": "k", "spritesheet": {**_SPRITE, "count": True}},
    {"spritesheet_key": "k", "spritesheet": {"columns": 5}},
])
def test_a_half_or_malformed_spritesheet_in_completed_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ev.MalformedEvent, match="spritesheet"):
        ev.encode(ev.Event(new_task_id(), ev.EventType.COMPLETED, {**_DONE, **bad}))
