"""Socket-level fuzz against a live pgherd with 2 workers (tests/fuzzing.py): 5,000 cases of
valid, malformed, truncated and oversized input, before and after login, 24 connections at
once, while a bystander client runs queries. ``make fuzz`` runs 100,000+."""

from __future__ import annotations

from tests import fuzzing

CASES = 5000


def test_hostile_input_costs_only_its_own_connection(pgherd):
    h = pgherd(settings=fuzzing.SETTINGS, workers=2)
    report = fuzzing.fuzz_service(h, seed=20261205, n=CASES)
    summary = "\n".join(report.lines())
    assert report.outcome.cases == CASES, summary
    assert report.pids_after == report.pids_before, summary  # no worker died
    assert report.bystander_queries > 0 and not report.bystander_errors, summary
    assert report.rss_growth() <= 0.10, summary
    log = h.log()
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]
    # and the service still serves, with its pools clean
    with h.connect(prepare_threshold=None) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
