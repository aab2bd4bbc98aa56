"""Start-time estimates replay admission over what runs and what waits."""

from __future__ import annotations

import pytest

from vidmaas.domain.eta import Running, Waiting, estimate_starts, remaining_s


def test_a_running_task_is_judged_by_history_first_then_by_its_progress() -> None:
    assert remaining_s(Running(1, "m", elapsed_s=20), typical_s=100) == 80
    assert remaining_s(Running(1, "m", elapsed_s=150), typical_s=100) == 0
    # Half done after 30 s: 30 s more, whatever history says.
    assert remaining_s(Running(1, "m", elapsed_s=30, percent=50), typical_s=100) == 30
    # 15 % done: half trusted.
    got = remaining_s(Running(1, "m", elapsed_s=15, percent=15), typical_s=100)
    assert got == pytest.approx(0.5 * 85 + 0.5 * 85)


def test_tasks_start_in_order_as_gpus_free_up_and_the_head_blocks_smaller_ones() -> None:
    starts = estimate_starts(
        capacity=4,
        running=[Running(2, "big", elapsed_s=10), Running(1, "small", elapsed_s=0)],
        waiting=[Waiting("a", 1, "small"), Waiting("b", 4, "big"), Waiting("c", 1, "small")],
        run_s={"big": 100, "small": 20}, default_run_s=60)
    # a fits at once (1 free); b needs all 4: after the big one ends (90 s) and a (20 s);
    # c waits behind b although a GPU is free meanwhile.
    assert starts == {"a": 0.0, "b": 90.0, "c": 190.0}


def test_a_task_bigger_than_the_capacity_never_starts_and_unknown_models_use_the_default(
        ) -> None:
    starts = estimate_starts(capacity=2, running=[Running(2, "x", elapsed_s=0)],
                             waiting=[Waiting("huge", 8, "x"), Waiting("next", 2, "new")],
                             run_s={}, default_run_s=60)
    assert starts == {"huge": None, "next": 60.0}
