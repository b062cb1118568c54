"""What clients can put in the log, bounded and inert.

Client ids, usernames, topics, versions and `desc` texts end up in log lines. Unchecked, a
64 KiB client id is logged in full per attempt, a newline in `desc` forges a log line, and
an ANSI escape repaints the operator's terminal. `install` makes every log record cut each
string argument to `log_field_max` characters and escape control characters; messages a
flood repeats per attempt are let through in bursts with a count of the rest (`Burst`).
"""
from __future__ import annotations

import logging
import re
from typing import Any

# C0/C1 controls, line separators, and the bidirectional overrides that reorder what a
# terminal shows (U+202A-U+202E, U+2066-U+2069, and the marks U+200E/U+200F).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_state = {"limit": 200, "installed": False}


def clean_field(value: str, limit: int | None = None) -> str:
    """`value` cut to `limit` characters, control characters (newlines, ESC) escaped."""
    limit = _state["limit"] if limit is None else limit
    cut = value if len(value) <= limit else f"{value[:limit]}...({len(value)} chars)"
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], cut)


def _clean_arg(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return clean_field(value, limit)
    if isinstance(value, (bytes, bytearray)):
        return clean_field(bytes(value[:limit * 4]).decode("utf-8", "backslashreplace"), limit)
    if isinstance(value, BaseException):
        return clean_field(str(value), limit * 4)
    return value


def install(log_field_max: int) -> None:
    """Clean every record's arguments from now on (process-wide; the latest limit wins)."""
    _state["limit"] = log_field_max
    if _state["installed"]:
        return
    _state["installed"] = True
    make_record = logging.getLogRecordFactory()

    def clean_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        limit = _state["limit"]
        if record.args:
            if isinstance(record.args, dict):
                record.args = {key: _clean_arg(value, limit) for key, value in record.args.items()}
            else:
                record.args = tuple(_clean_arg(value, limit) for value in record.args)
        elif isinstance(record.msg, str) and (len(record.msg) > limit * 8 or _CONTROL.search(record.msg)):
            # Formatted before logging (amqtt's f-strings): the whole message is one field.
            record.msg = clean_field(record.msg, limit * 8)
        return record

    logging.setLogRecordFactory(clean_record)


class Burst(logging.Filter):
    """Lets `burst` records starting with one of `prefixes` through per `interval` seconds;
    the next one through says how many were held back. Other records pass untouched."""

    def __init__(self, prefixes: tuple[str, ...], *, burst: int = 5, interval: float = 10.0) -> None:
        super().__init__()
        self.prefixes, self._burst, self._interval = prefixes, burst, interval
        self._window_start, self._passed, self._held = -interval, 0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefixes):
            return True
        now = record.created
        if now - self._window_start >= self._interval:
            self._window_start, self._passed = now, 0
        if self._passed >= self._burst:
            self._held += 1
            return False
        self._passed += 1
        note = ""
        if record.exc_info and record.exc_info[1] is not None:
            # A flood's traceback says nothing new; its one line does.
            error = record.exc_info[1]
            note = f": {type(error).__name__}: {clean_field(str(error))}"
            record.exc_info, record.exc_text = None, None
        if self._held:
            note += f" ({self._held} more like this held back)"
            self._held = 0
        if note:
            record.msg = f"{record.msg}{note.replace('%', '%%') if record.args else note}"
        return True


def limit_floods() -> None:
    """Lines a client can make the server repeat per message it sends: in bursts."""
    floods = {
        "ota.mqtt": ("bad ", "client ", "%s from %s dropped"),
        "ota.engine": ("version report from", "progress "),
        "ota.broker": ("SUBSCRIBE refused", "retained message"),
        # a request per device passed to a worker that just died, refused while a partition moves
        "ota.cluster": ("cluster: worker ", "cluster: %s answered"),
        "aiohttp.server": ("Error handling request",),
        "amqtt.mqtt.protocol.handler": ("BrokerProtocolHandler Unhandled exception", "Received PUB", "PUBACK waiter",
                                        "PUBREC waiter", "PUBCOMP waiter", "Unhandled exception"),
        "asyncio": ("Task exception was never retrieved", "Task was destroyed but it is pending"),
    }
    for name, prefixes in floods.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, Burst) and f.prefixes == prefixes for f in logger.filters):
            logger.addFilter(Burst(prefixes, burst=20))
