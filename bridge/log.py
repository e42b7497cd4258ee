"""Logging: one line per event, the association id (thread name) on every line.

Association threads are named ``A<n>`` when they start, delivery workers
``deliver-<destination>-<n>``, so ``%(threadName)s`` says whose line it is.
Patient names and IDs are never logged at INFO.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s [%(threadName)s] %(name)s: %(message)s"


def setup(level: str = "INFO") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # pydicom logs each decoder plugin's failure with a traceback; the error it then raises
    # says the same in one line, which bridge.dimse.transcode puts into the row's reason.
    logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)
