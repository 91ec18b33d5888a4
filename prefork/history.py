"""The last minutes of the service, for the charts of the HTTP status page.

Every :data:`INTERVAL` seconds the master adds one sample of the whole service to the history
ring in shared memory (``shm.HISTORY_FIELDS``: the stats counters summed over every pool, the
client and server gauges summed, the oldest waiting client's wait). Whichever worker answers
``/status.json`` reads the ring and turns consecutive samples into rates
(``workers/statuspage.py``).

Why the master and shared memory, not a ring per worker: a sample reads every row of the
pool table (``Segment.snapshot_rows``), about 0.12 ms per row on the development box (2.5 ms
for 10 pools, 24 ms for 100). In a worker that time would be taken from its clients at every
sample, once per worker; in the master, which runs no pooling code, it is taken once for the
service and stalls nobody. And every worker then answers with the same history, whichever one
the kernel hands a request to. The master samples only when the HTTP endpoint is configured.
"""

from __future__ import annotations

import time

from ipc import shm

INTERVAL = 2.0  # seconds between samples: 300 samples are the last 10 minutes

#: Fields of a sample summed over the pools (all but the time and the oldest wait).
_SUMMED = tuple(f for f in shm.HISTORY_FIELDS if f not in ("at_ns", "maxwait_ns"))


def service_sample(rows: list[shm.RowSnapshot], now_ns: int) -> dict[str, int]:
    """One history sample of the pool rows in ``rows`` at ``now_ns`` (monotonic)."""
    sample = dict.fromkeys(shm.HISTORY_FIELDS, 0)
    sample["at_ns"] = now_ns
    for row in rows:
        if row.kind != shm.POOL:
            continue
        for name in _SUMMED:
            sample[name] += row.totals[name]
        sample["maxwait_ns"] = max(sample["maxwait_ns"], row.wait_ns(now_ns))
    return sample


class HistorySampler:
    """Called by the master on every loop tick; samples once :data:`INTERVAL` has passed."""

    def __init__(self, segment: shm.Segment) -> None:
        self.segment = segment
        self.next_at = 0.0

    def tick(self, now: float) -> None:
        if now < self.next_at:
            return
        self.next_at += INTERVAL
        if self.next_at <= now:  # first sample, or fell behind: no burst of samples
            self.next_at = now + INTERVAL
        seg = self.segment
        seg.history_append(**service_sample(seg.snapshot_rows(), time.monotonic_ns()))
