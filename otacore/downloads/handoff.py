"""Downloads handed off to nginx (X-Accel-Redirect), until its access log says how many bytes
each one sent (docs/cluster-downloads.md).

Each authorized download nginx serves gets a token: 128 random bits the server hands to
nginx in a response header and nginx writes into one access log line once the transfer
ends, with its status and body bytes. The token, not the line, says which job the bytes are
for: a line credits only a token the server handed out and has not settled yet, once, and
at most the file's size. Malformed, spoofed, replayed or late lines change nothing.

A hand-off is a transfer under way (the job's Transfer: started, then finished with the
bytes), so it keeps its job from timing out until its line comes; one whose line never
comes (nginx stopped, a datagram lost) is finished with 0 bytes after `max_age` seconds or
when its job has too many waiting.
"""
from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# The access log line nginx sends (config/nginx/ota-downloads.conf.template, log_format
# ota_accel) as an RFC 3164 syslog message: `<PRI>Mmm dd hh:mm:ss [HOST ]ota_accel: ` and
# `ota1 TOKEN STATUS BODY_BYTES`.
SYSLOG_TAG = "ota_accel"
MAX_LINE = 512
_LINE = re.compile(rb"<[0-9]{1,3}>[A-Z][a-z]{2} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} (?:[!-~]{1,255} )?"
                   + SYSLOG_TAG.encode() + rb": ota1 ([0-9a-f]{32}) ([1-5][0-9]{2}) ([0-9]{1,15})\n?")
PER_JOB = 32  # hand-offs waiting per job: a device's parallel range requests
LIMIT = 65536  # hand-offs waiting in all


class Transfer(Protocol):
    """What the engine's Transfer does (otacore/engine.py)."""

    @property
    def job_id(self) -> int: ...

    def started(self) -> None: ...

    def finished(self, sent: int) -> None: ...


@dataclass(frozen=True)
class LogLine:
    token: str
    status: int
    sent: int


def parse_log_line(datagram: bytes) -> LogLine | None:
    """The line nginx sent, or None for anything else."""
    if len(datagram) > MAX_LINE:
        return None
    match = _LINE.fullmatch(datagram)
    if match is None:
        return None
    return LogLine(match[1].decode(), int(match[2]), int(match[3]))


@dataclass
class _HandOff:
    transfer: Transfer
    job_id: int
    size: int
    at: float


class HandOffs:
    """Transfers nginx is serving, by token, oldest first."""

    def __init__(self, max_age: float, clock: Callable[[], float] = time.monotonic,
                 per_job: int = PER_JOB, limit: int = LIMIT) -> None:
        self.max_age, self._clock, self._per_job, self._limit = max_age, clock, per_job, limit
        self._waiting: OrderedDict[str, _HandOff] = OrderedDict()
        self._by_job: dict[int, deque[str]] = {}
        self.settled = 0  # lines that credited a hand-off
        self.ignored = 0  # lines (or datagrams) that named nothing waiting
        self.abandoned = 0  # hand-offs finished with 0 bytes, their line never came

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, transfer: Transfer, size: int) -> str:
        """A download of `size` bytes at most handed to nginx: started now; the token to give it."""
        token, job_id = secrets.token_hex(16), transfer.job_id
        transfer.started()
        self._waiting[token] = _HandOff(transfer, job_id, size, self._clock())
        tokens = self._by_job.setdefault(job_id, deque())
        tokens.append(token)
        if len(tokens) > self._per_job:
            self._abandon(tokens[0])
        if len(self._waiting) > self._limit:
            self._abandon(next(iter(self._waiting)))
        return token

    def settle(self, line: LogLine) -> bool:
        """Credit the bytes of the line's hand-off (200/206: its body bytes, at most the file;
        any other status: none). False, and nothing changed, if the token is not waiting."""
        entry = self._pop(line.token)
        if entry is None:
            self.ignored += 1
            return False
        self.settled += 1
        entry.transfer.finished(min(line.sent, entry.size) if line.status in (200, 206) else 0)
        return True

    def ignore(self) -> None:
        """A datagram that is not a line of ours."""
        self.ignored += 1

    def expire(self) -> int:
        """Finish with 0 bytes the hand-offs older than max_age; how many."""
        cutoff, old = self._clock() - self.max_age, []
        for token, entry in self._waiting.items():  # oldest first
            if entry.at >= cutoff:
                break
            old.append(token)
        for token in old:
            self._abandon(token)
        return len(old)

    def oldest_age(self) -> float | None:
        """Seconds the oldest hand-off has waited for its line; None when none waits."""
        for entry in self._waiting.values():
            return self._clock() - entry.at
        return None

    def close(self) -> None:
        """Finish every waiting hand-off with 0 bytes (the server stops)."""
        for token in list(self._waiting):
            self._abandon(token)

    def _abandon(self, token: str) -> None:
        entry = self._pop(token)
        if entry is not None:
            self.abandoned += 1
            entry.transfer.finished(0)

    def _pop(self, token: str) -> _HandOff | None:
        entry = self._waiting.pop(token, None)
        if entry is not None:
            tokens = self._by_job[entry.job_id]
            tokens.remove(token)
            if not tokens:
                del self._by_job[entry.job_id]
        return entry
