"""The sync benchmark's CPU accounting: per-process CPU seconds from /proc, medians and totals."""

from __future__ import annotations

import os
import sys
import time

import pytest

from rollout.bench.sync import CpuMeter, cpu_seconds, median_cpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_cpu_meter_counts_the_cpu_this_process_burns_and_names_each_process():
    with CpuMeter([os.getpid()]) as meter:
        end = time.process_time() + 0.2
        while time.process_time() < end:  # busy: 0.2 s of CPU
            pass
    assert list(meter.used) == ["driver", "worker0"]
    assert all(used is not None and used >= 0.1 for used in meter.used.values())


def test_a_process_that_is_gone_has_no_cpu_seconds_and_is_left_out_of_the_medians():
    assert cpu_seconds(2**22 + 12345) is None  # above the default pid_max: no such process
    runs = [{"driver": 0.1, "worker0": 0.3, "worker1": None}, {"driver": 0.3, "worker0": 0.5, "worker1": 0.2}]
    assert median_cpu(runs) == pytest.approx({"driver": 0.2, "worker0": 0.4, "total": 0.6})
