"""A node whose wall clock is wrong, for one process: with this folder on PYTHONPATH, Python runs
this at start-up, and every wall-clock read of Python code (time.time, time.time_ns,
datetime.datetime.now/utcnow, Optuna's timestamps included) is CIFAR_DIST_TEST_CLOCK_SKEW_S seconds
off. The monotonic clock is left alone, as a skewed node's is."""

import datetime
import os
import time

SKEW_S = float(os.environ.get("CIFAR_DIST_TEST_CLOCK_SKEW_S") or 0)

if SKEW_S:
    _time, _time_ns, _skew = time.time, time.time_ns, datetime.timedelta(seconds=SKEW_S)
    time.time = lambda: _time() + SKEW_S
    time.time_ns = lambda: _time_ns() + int(SKEW_S * 1e9)

    class SkewedDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return super().now(tz) + _skew

        @classmethod
        def utcnow(cls):
            return super().now(datetime.timezone.utc).replace(tzinfo=None) + _skew

    datetime.datetime = SkewedDatetime
