"""Structured logs: JSON when not on a terminal, readable when on one; colours only on a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog

from .config import redact


def _redact_urls(_: object, __: str, event: dict[str, object]) -> dict[str, object]:
    """No log line carries the user and password of a URL, whoever logs it."""
    return {k: redact(v) if isinstance(v, str) and "@" in v else v for k, v in event.items()}


def configure(level: str = "info", fmt: str = "auto") -> None:
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=colours())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_urls,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def colours() -> bool:
    """ANSI colours only when the log goes to a terminal: a file, a pipe or a wasmCloud host's log
    collector gets plain text. NO_COLOR (https://no-color.org) turns them off anywhere."""
    return sys.stderr.isatty() and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
