"""Helpers of ``bench/ingest``: the test series, the peers, the fsync floor, the profiler."""
