#!/usr/bin/env python3
"""bench/pull: `dicom-bridge dicomweb pull` of the 200-instance CT series of bench/ingest
against dicomweb-client's own ``iter_series``, on the same Orthanc in
the same run (issue 20; bench/ingestlib/dicomweb_cli.py has the details). Prints each
side's median seconds, the ratio to dicomweb-client (goal: 1.0 or lower) and peak RSS.

    python3 bench/pull [--repeat 3] [--instances 200]
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

from ingestlib.dicomweb_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("pull", __doc__ or ""))
