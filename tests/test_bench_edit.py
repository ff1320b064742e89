"""The step-time breakdown that bench_edit.py prints (pure arithmetic, checked on made-up clocks)."""

from __future__ import annotations

import pytest

from bench_edit import step_time_profile


def test_step_time_profile_leaves_out_sweep_steps_and_names_the_slow_ones():
    durations = [0.010] * 100
    durations[20] = 5.0  # a sweep: left out
    durations[50] = 0.510  # a checkpoint save: 0.5 s beyond the median
    ends, clock = [], 0.0
    for seconds in durations:
        clock += seconds
        ends.append(clock)
    profile = step_time_profile(ends, first_step=1000, sweep_steps=[1020])
    assert profile["median_ms"] == pytest.approx(10.0)
    assert profile["excess_s"] == pytest.approx(0.5)
    assert profile["slowest"][0] == {"step": 1050, "ms": 510.0}
    assert all(row["step"] != 1020 for row in profile["slowest"])
