"""Logging: one line per event, the association id (thread name) on every line.

Association threads are named ``A<n>`` when they start, delivery workers
``deliver-<destination>-<n>``, so ``%(threadName)s`` says whose line it is.
Patient names and IDs are never logged at INFO.

Two formats: ``text`` (the default, for people) and ``json`` (one JSON object a line,
for log collectors): ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``association``
(the ``A<n>`` id, or null on other threads), ``thread``, ``event`` (the message) and
``fields`` (the values passed with ``extra=``, and ``exc``, the traceback, when there is one).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal

FORMAT = "%(asctime)s %(levelname)-7s [%(threadName)s] %(name)s: %(message)s"
LogFormat = Literal["text", "json"]

_ASSOCIATION = re.compile(r"A\d+")
# What every LogRecord has: anything else on a record came from extra=.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {key: _plain(value) for key, value in record.__dict__.items() if key not in _STANDARD}
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exc"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        thread = record.threadName or ""
        return json.dumps({
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "association": thread if _ASSOCIATION.fullmatch(thread) else None,
            "thread": thread,
            "event": record.getMessage(),
            "fields": fields,
        }, ensure_ascii=False)


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it: itself when it can, else its text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def setup(level: str = "INFO", log_format: LogFormat = "text") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # pydicom logs each decoder plugin's failure with a traceback; the error it then raises
    # says the same in one line, which bridge.dimse.transcode puts into the row's reason.
    logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)
