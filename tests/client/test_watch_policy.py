"""The watch policy both clients drive, fed by hand: what it yields and what it does next."""

from __future__ import annotations

import pytest

from vidmaas.client.watch import Deadline, Do, Step, WatchPolicy
from vidmaas.client.wire import ClientError, Message


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def task(status: str, *, progress: float = 0.0, stage: str | None = None,
         position: int | None = None) -> dict[str, object]:
    return {"id": "t1", "status": status, "progress": progress, "stage": stage,
            "queue_position": position}


def event(kind: str, event_id: str, **data: object) -> Message:
    return {"type": kind, "id": event_id, "task_id": "t1", "data": data}


SNAPSHOT: Message = {"type": "snapshot", "id": "1-0", "data": {"status": "queued"}}


def test_a_watch_opens_the_stream_and_yields_messages_until_a_terminal_one() -> None:
    p = WatchPolicy("t1")
    assert p.start() == Step(Do.OPEN)
    assert p.message(SNAPSHOT) == Step(Do.READ, emit=(SNAPSHOT,))
    progress = event("progress", "2-0", percent=10.0)
    assert p.message(progress) == Step(Do.READ, emit=(progress,))
    done = event("completed", "3-0")
    assert p.message(done) == Step(Do.STOP, emit=(done,))
    assert p.last_event_id == "3-0"


def test_pings_are_not_yielded_but_move_the_resume_point() -> None:
    p = WatchPolicy("t1", after="1-0")
    assert p.last_event_id == "1-0"
    assert p.message({"type": "ping", "id": "5-0"}) == Step(Do.READ)
    assert p.last_event_id == "5-0"


def test_a_final_failure_after_a_retryable_one_ends_on_a_settled_snapshot() -> None:
    clock = Clock()
    p = WatchPolicy("t1", clock=clock, settle_interval_s=0.25)
    p.start()
    failed = event("failed", "4-0", code="oom", retryable=True)
    assert p.message(failed) == Step(Do.FETCH, emit=(failed,))
    assert p.task(task("running")) == Step(Do.FETCH, delay_s=0.25)
    ended = task("failed")
    assert p.task(ended) == Step(Do.STOP, emit=({"type": "snapshot", "task_id": "t1",
                                                 "task": ended},))


def test_a_retry_or_an_undecided_task_goes_back_to_reading_the_stream() -> None:
    clock = Clock()
    p = WatchPolicy("t1", clock=clock, settle_wait_s=5.0)
    p.start()
    p.message(event("failed", "4-0", retryable=True))
    assert p.task(task("queued", position=1)) == Step(Do.READ)
    p.message(event("failed", "6-0", retryable=True))
    clock.now_s += 5.1
    assert p.task(task("running")) == Step(Do.READ)


def test_a_stream_that_closes_early_is_reopened_from_the_last_id_unless_the_task_ended(
        ) -> None:
    p = WatchPolicy("t1")
    p.start()
    p.message(event("progress", "7-0", percent=50.0))
    assert p.ended() == Step(Do.FETCH)
    assert p.task(task("running")) == Step(Do.OPEN, delay_s=0.4)
    assert p.last_event_id == "7-0"
    assert p.ended() == Step(Do.FETCH)
    done = task("completed")
    assert p.task(done).emit == ({"type": "snapshot", "task_id": "t1", "task": done},)


def test_drops_back_off_and_give_up_after_max_reconnects_in_a_row() -> None:
    p = WatchPolicy("t1", max_reconnects=4)
    p.start()
    down = ClientError(0, "unreachable", "cannot reach")
    delays = [p.failed(down).delay_s for _ in range(3)]
    assert delays == [0.4, 0.8, 1.6]
    p.message(SNAPSHOT)  # anything received resets the count
    assert [p.failed(ClientError(503, "http_503", "busy")).delay_s for _ in range(4)] == [
        0.4, 0.8, 1.6, 3.2]
    with pytest.raises(ClientError) as info:
        p.failed(down)
    assert info.value.code == "stream_lost"


def test_the_backoff_is_capped_at_five_seconds() -> None:
    p = WatchPolicy("t1", max_reconnects=100)
    p.start()
    for _ in range(10):
        last = p.failed(ClientError(502, "http_502", "bad gateway"))
    assert last == Step(Do.OPEN, delay_s=5.0)


@pytest.mark.parametrize("error", [ClientError(404, "task_not_found", "no such task"),
                                   ClientError(401, "unauthenticated", "bad key"),
                                   ClientError(422, "invalid_request", "bad after")])
def test_an_error_a_watch_cannot_get_over_is_raised(error: ClientError) -> None:
    p = WatchPolicy("t1")
    p.start()
    with pytest.raises(ClientError) as info:
        p.failed(error)
    assert info.value is error


def test_a_server_without_a_stream_is_polled_and_only_changes_are_yielded() -> None:
    p = WatchPolicy("t1", poll_interval_s=2.0)
    p.start()
    assert p.failed(ClientError(404, "not_found", "Not Found")) == Step(Do.FETCH)
    first = task("queued", position=2)
    assert p.task(first).emit == ({"type": "snapshot", "task_id": "t1", "task": first},)
    assert p.task(task("queued", position=2)) == Step(Do.FETCH, delay_s=2.0)
    moved = task("running", progress=30.0, stage="denoise")
    assert p.task(moved) == Step(Do.FETCH, delay_s=2.0, emit=(
        {"type": "snapshot", "task_id": "t1", "task": moved},))
    done = task("completed", progress=100.0)
    assert p.task(done).do is Do.STOP
    # While polling, an error is the caller's.
    with pytest.raises(ClientError):
        p.failed(ClientError(503, "http_503", "busy"))


def test_wait_ends_with_the_task_once_it_ended_and_times_out_otherwise() -> None:
    clock = Clock()
    deadline = Deadline("t1", timeout_s=10.0, clock=clock)
    assert deadline.done(task("running")) is False
    assert deadline.done(task("cancelled")) is True
    clock.now_s += 10.5
    with pytest.raises(ClientError) as info:
        deadline.done(task("running"))
    assert info.value.code == "timeout" and "running" in info.value.message
