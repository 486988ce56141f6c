"""The server's log lines: plain text (a request's lines end with its id) or JSON, one record one
line whatever a client put in a path or header."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from quicknet.serve.config import Settings


class JsonFormatter(logging.Formatter):
    FIELDS = ("request_id", "status", "duration_ms", "client", "model", "version", "images", "reason")

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            # UTC to the millisecond, zone written (RFC 3339): what log shippers parse without a
            # format of their own, and a second's lines keep their order across processes
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "process": record.processName,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def printable(text: str) -> str:
    """`text` with every control or other non-printable character escaped (`\\x0a`, `\\u2028`): a
    client's path or header can put no line break, carriage return or terminal escape in a log."""
    if text.isprintable():  # the usual line: one C call
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)


class TextFormatter(logging.Formatter):
    """Plain lines; a request's lines end with its id, so one grep finds a request in every log.
    One record is one line (a traceback follows on lines of its own): every field is escaped
    (`printable`), so `GET /x%0A<forged line>` cannot forge a line. JSON lines escape by themselves."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} request_id={printable(str(request_id))}" if request_id else line


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
