"""The v1 event wire format."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vidmaas.domain import events as ev
from vidmaas.domain.ids import new_task_id

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
