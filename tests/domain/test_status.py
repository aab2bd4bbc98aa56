"""The task state machine."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vidmaas.domain.status import TERMINAL, TRANSITIONS, TaskStatus, check_transition
from vidmaas.errors import IllegalTransition


def test_terminal_statuses_have_no_way_out() -> None:
    for status in TERMINAL:
        assert TRANSITIONS[status] == frozenset()
        for to in TaskStatus:
            with pytest.raises(IllegalTransition):
                check_transition(status, to)


def test_the_design_moves_are_all_legal() -> None:
    S = TaskStatus
    legal = [(S.QUEUED, S.DISPATCHING), (S.DISPATCHING, S.RUNNING), (S.RUNNING, S.COMPLETED),
             (S.RUNNING, S.FAILED), (S.RUNNING, S.CANCELLING), (S.CANCELLING, S.CANCELLED),
             (S.QUEUED, S.CANCELLED), (S.DISPATCHING, S.CANCELLED), (S.RUNNING, S.QUEUED),
             (S.DISPATCHING, S.QUEUED), (S.QUEUED, S.FAILED), (S.DISPATCHING, S.FAILED),
             (S.CANCELLING, S.FAILED)]
    for a, b in legal:
        check_transition(a, b)


def test_a_queued_task_cannot_jump_to_running_or_completed() -> None:
    for to in (TaskStatus.RUNNING, TaskStatus.COMPLETED, TaskStatus.CANCELLING):
        with pytest.raises(IllegalTransition):
            check_transition(TaskStatus.QUEUED, to)


@given(st.lists(st.sampled_from(list(TaskStatus)), max_size=30))
def test_no_sequence_of_requested_moves_leaves_the_state_machine(moves: list[TaskStatus]) -> None:
    status = TaskStatus.QUEUED
    for to in moves:
        try:
            check_transition(status, to)
        except IllegalTransition:
            continue
        assert to in TRANSITIONS[status]
        status = to
        if status in TERMINAL:
            assert all(to not in TRANSITIONS[status] for to in TaskStatus)
