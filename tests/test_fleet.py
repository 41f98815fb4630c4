"""A small fleet through two gateway workers, one SIGKILLed mid-run: every capture stored
exactly once (counted from the workers' own events and the stored files)."""

from sim.fleet import run_fleet


def test_a_worker_dying_mid_run_loses_and_duplicates_nothing(tmp_path):
    result = run_fleet(tmp_path, devices=12, captures=4, workers=2, kill_worker_after=10,
                       timeout=120)
    assert result.killed_worker
    assert result.accepted == 48
    assert result.stored == 48
    assert result.lost == 0
    assert result.duplicated == 0
