#!/usr/bin/env python3
"""bench/push: `dicom-bridge dicomweb push` of the 200-instance CT series of bench/ingest
against dicomweb-client's own ``store_instances`` (in batches of --batch), on the same Orthanc in
the same run (issue 20; bench/ingestlib/dicomweb_cli.py has the details). Prints each
side's median seconds, the ratio to dicomweb-client (goal: 1.0 or lower) and peak RSS.

    python3 bench/push [--repeat 3] [--instances 200]
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

from ingestlib.dicomweb_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("push", __doc__ or ""))
