"""Logging for the ingest CLI, with the bearer token scrubbed from every record.

tweepy logs request headers (Authorization included) at DEBUG, and error text
can echo a request back; the filter makes ``--log-level DEBUG`` safe anyway.
"""

from __future__ import annotations

import logging

REDACTED = "[REDACTED]"


class RedactFilter(logging.Filter):
    """Replaces each secret in a record's final message (and traceback) by REDACTED."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        for secret in self.secrets:
            message = message.replace(secret, REDACTED)
            if record.exc_text:
                record.exc_text = record.exc_text.replace(secret, REDACTED)
        record.msg, record.args = message, None
        return True


def setup_logging(level: str = "INFO") -> RedactFilter:
    """Logs to stderr; returns the filter so secrets can be added once they are read."""
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact = RedactFilter([])
    for handler in logging.getLogger().handlers:
        handler.addFilter(redact)
    return redact
