"""Per-model usage counters: GPU-seconds and queue wait, never per user."""

from __future__ import annotations

from vidmaas.metrics import Metrics, render


def test_usage_is_counted_per_model_and_odd_model_names_fold_into_other() -> None:
    m = Metrics(role="relay")
    m.observe_usage(model="wan2.2-t2v-a14b", gpu_seconds=800.0, queue_wait_s=12.5)
    m.observe_usage(model="wan2.2-t2v-a14b", gpu_seconds=400.0, queue_wait_s=None)
    m.observe_usage(model="tiny-t2v", gpu_seconds=None, queue_wait_s=0.5)
    m.observe_usage(model='evil"} 1\nx{', gpu_seconds=-3.0, queue_wait_s=1.0)
    text = render(m).decode()
    assert 'vidmaas_gpu_seconds_total{model="wan2.2-t2v-a14b"} 1200.0' in text
    assert 'vidmaas_model_queue_wait_seconds_total{model="wan2.2-t2v-a14b"} 12.5' in text
    assert 'vidmaas_model_queue_wait_seconds_total{model="tiny-t2v"} 0.5' in text
    assert 'vidmaas_gpu_seconds_total{model="other"} 0.0' in text
    assert "evil" not in text and "user" not in text.split("vidmaas_gpu_seconds_total")[1][:200]
