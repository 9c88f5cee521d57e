"""The end-to-end benchmark's timeline: a row's GPU busy share is the mean of the readings since
the row before, not the one reading that happened to fall on the row (NVML's utilisation swings
between 0 and 100 as decode steps and host work alternate)."""

from __future__ import annotations

from bench.e2e_services import GpuProbe, Sample, Sampler


def test_timeline_rows_average_the_gpu_readings_since_the_row_before() -> None:
    sampler = Sampler(GpuProbe(0), roots={})
    readings = [100, 0, 100, 0, 90, 10, 0, 100, 50, 50]  # one every 0.5 s from t = 0
    sampler.samples = [
        Sample(at=0.5 * i, gpu_busy=busy, gpu_mem_gib=1.0, rss_gib={}, cpu_s={})
        for i, busy in enumerate(readings)
    ]

    rows = sampler.timeline(start=0.0, every=2.0)

    assert [row["s"] for row in rows] == [0.0, 2.0, 4.0]
    # A row covers the readings after the previous row up to its own.
    assert [row["gpu_busy"] for row in rows] == [
        100.0,
        (0 + 100 + 0 + 90) / 4,
        (10 + 0 + 100 + 50) / 4,
    ]
