"""A batch's rollout policy (the optional batch keys: state, tags, percent, waves,
rate_per_minute, retry, start_at, end_at, windows, abort): reading it from the catalog with
file:line errors, and the pure questions asked of it (who is in, is it open now, when next).

Time is always passed in (epoch seconds), never read here: the core's clock decides.

The rule for reading: whatever is accepted here, the server can run, without an exception and
without work that grows with a value (every number finite and bounded, every time within
datetime's years, every cron able to match, few windows and waves). docs/rollouts.md lists
the ranges.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from cronsim import CronSim, CronSimError

FAILURE_KINDS = ("failed", "download", "verify", "flash", "timeout", "boot")
STEP_KINDS = {-1: "failed", -2: "download", -3: "verify", -4: "flash"}
_OFFSET_RE = re.compile(r"^(?:UTC|Z|[+-]\d{2}:?\d{2})\Z")

# The ranges a catalog may use (docs/rollouts.md). Times: well inside datetime's years 1..9999
# whatever the offset, so every time and every opening near them can be formatted.
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
LATEST = dt.datetime(9000, 1, 1, tzinfo=dt.timezone.utc)
MAX_MINUTES = 525_600  # a year: soak_minutes, retry.interval_minutes, timeout_minutes
MAX_WINDOW_MINUTES = 7 * 24 * 60  # a week
MAX_RATE = 1_000_000  # rate_per_minute
MAX_RETRIES = 100  # retry.count
MAX_MIN_FINISHED = 10_000_000  # abort.min_finished
MAX_WINDOWS = 24  # windows per batch
MAX_WAVES = 24  # waves per batch: status counts every wave's jobs on each request
MAX_CRON_CHARS = 200
MAX_CRON_ITEMS = 60  # comma-separated items in one cron field


@dataclass(frozen=True)
class Wave:
    percent: float  # cumulative share of the batch's devices
    success_percent: float | None = None  # of waves 1..k's jobs, to open wave k+1
    soak_minutes: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    count: int
    interval_minutes: float
    on: frozenset[str] = frozenset(FAILURE_KINDS)


@dataclass(frozen=True)
class AbortRule:
    failure_percent: float
    min_finished: int = 1


@dataclass(frozen=True)
class Cron:
    """A five-field cron (minute hour day-of-month month day-of-week) that can match; the
    sets are what each field allows (weekday 0 = Sunday; 7 is read as 0)."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]


@dataclass(frozen=True)
class Window:
    """Openings at the cron's times (read at `offset`), each lasting `minutes`. Its answers
    come from cronsim, a field at a time, so they cost the same for 10 minutes as for a week;
    and the latest and next openings are kept until `now` passes the next one."""

    cron: Cron
    minutes: float
    offset: dt.timezone
    # [valid from, valid until, latest opening at or before, next opening after]
    _span: list[Any] = field(default_factory=list, compare=False, repr=False)

    def open_at(self, now: float) -> float | None:
        """When the opening that covers `now` began, or None when `now` is outside. Openings
        are all `minutes` long, so the latest one is the only one that can still be open."""
        latest, _ = self._openings(now)
        return latest if latest is not None and now < latest + self.minutes * 60 else None

    def next_open(self, now: float) -> float | None:
        """The next opening after `now` (within cronsim's 50 years), or None."""
        return self._openings(now)[1]

    def _openings(self, now: float) -> tuple[float | None, float | None]:
        span = self._span
        if span and span[0] <= now < span[1]:
            return span[2], span[3]
        latest, upcoming = self._step(now, reverse=True), self._step(now, reverse=False)
        # Valid until the next opening; a cron that matched neither way (refused when read,
        # so only by a clock near year 9999) is not searched again every second.
        until = upcoming if upcoming is not None else (math.inf if latest is None else now + 60)
        self._span[:] = [latest if latest is not None else now, until, latest, upcoming]
        return latest, upcoming

    def _step(self, now: float, *, reverse: bool) -> float | None:
        """The latest opening at or before `now`, or the first after it; None when cronsim
        finds none within 50 years or the dates leave datetime's range."""
        try:
            # Reverse iteration steps back one second first: start a second late to count now.
            start = dt.datetime.fromtimestamp(math.floor(now) + (1 if reverse else 0), self.offset)
            return next(CronSim(self.cron.text, start, reverse=reverse)).timestamp()
        except (CronSimError, StopIteration, OverflowError, ValueError, OSError):
            return None


@dataclass(frozen=True)
class RolloutPolicy:
    state: str | None = None  # active | paused, as written in the catalog (None: not written)
    tags: tuple[str, ...] | None = None
    percent: float | None = None
    waves: tuple[Wave, ...] = ()
    rate_per_minute: int | None = None
    retry: RetryPolicy | None = None
    start_at: float | None = None
    end_at: float | None = None
    windows: tuple[Window, ...] = ()
    abort: AbortRule | None = None
    text: dict[str, Any] = field(default_factory=dict, compare=False)  # as written, for status

    @property
    def empty(self) -> bool:
        return self == RolloutPolicy()

    def share_limit(self) -> float:
        """The share of devices the batch may ever reach (100 without percent or waves)."""
        if self.waves:
            return self.waves[-1].percent
        return 100.0 if self.percent is None else self.percent


def device_share(batch_name: str, device_name: str) -> float:
    """Where a device falls in [0, 100) for this batch: stable across restarts, reloads and
    machines, and independent per batch (a device first in one batch is not first in all)."""
    digest = hashlib.sha256(f"{batch_name}\0{device_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 * 100


def wave_index(policy: RolloutPolicy, share: float) -> int | None:
    """The 0-based wave a device's share falls in, or None when outside every wave."""
    for index, wave in enumerate(policy.waves):
        if share < wave.percent:
            return index
    return None


def schedule_block(policy: RolloutPolicy, now: float) -> tuple[str, float | None] | None:
    """Why the schedule allows no new job at `now` (reason, until when), or None when it does."""
    if policy.start_at is not None and now < policy.start_at:
        return f"scheduled for {format_time(policy.start_at)}", policy.start_at
    if policy.end_at is not None and now >= policy.end_at:
        return f"ended at {format_time(policy.end_at)} (end_at)", None
    if policy.windows and not any(window.open_at(now) is not None for window in policy.windows):
        opens = [t for t in (window.next_open(now) for window in policy.windows) if t is not None]
        until = min(opens) if opens else None
        return (f"outside its window until {format_time(until)}" if until else "outside its window"), until
    return None


def format_time(epoch: float) -> str:
    try:
        return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):  # past year 9999: only a clock that far out gets here
        return f"{epoch:.0f} (seconds since 1970)"


# -- reading it from the catalog ------------------------------------------------------

class Checker(Protocol):
    def add(self, line: int, key: str, message: str) -> None: ...


POLICY_KEYS = {"state", "tags", "percent", "waves", "rate_per_minute", "retry", "start_at", "end_at", "windows",
               "abort"}


class _Counting:
    """A Checker that remembers whether anything was wrong."""

    def __init__(self, check: Checker) -> None:
        self.check, self.added = check, 0

    def add(self, line: int, key: str, message: str) -> None:
        self.added += 1
        self.check.add(line, key, message)


def read_policy(check: Checker, item: Any, key: str) -> RolloutPolicy:
    """The policy keys of one batch mapping (a yamlmarks.MarkedMap); problems go to `check`."""
    counting = _Counting(check)
    reader = _Reader(counting, item, key)
    state = reader.choice("state", ("active", "paused"))
    tags = reader.tags()
    percent = reader.number("percent", 0, 100, low_open=True)
    waves = reader.waves()
    if percent is not None and waves:
        counting.add(item.line_of("waves"), f"{key}.waves", "use either percent or waves, not both")
    rate = reader.number("rate_per_minute", 1, MAX_RATE, whole=True)
    retry = reader.retry()
    start_at, end_at = reader.time("start_at"), reader.time("end_at")
    if start_at is not None and end_at is not None and end_at <= start_at:
        counting.add(item.line_of("end_at"), f"{key}.end_at", "is not after start_at; a batch must have time to run")
    windows = reader.windows()
    abort = reader.abort()
    if counting.added:
        return RolloutPolicy()  # the catalog is refused; and a bad value's text may be huge (YAML aliases)
    text = {name: _plain(item[name]) for name in POLICY_KEYS if name in item and item[name] is not None}
    return RolloutPolicy(state, tags, percent, waves, int(rate) if rate is not None else None, retry, start_at,
                         end_at, windows, abort, text)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return value


def shown(value: Any) -> str:
    """A value for an error message: short, and never the walk of a big structure (YAML
    aliases can make a small file hold a list of a billion items)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if abs(value) < 10 ** 15:
            return repr(value)
        return f"a number of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57]) + f"... ({len(value)} characters)"
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, dict):
        return "a mapping"
    return "a list" if isinstance(value, list) else type(value).__name__


class _Reader:
    def __init__(self, check: Checker, item: Any, key: str) -> None:
        self.check, self.item, self.key = check, item, key

    def bad(self, name: str, message: str, where: Any = None, index: Any = None) -> None:
        holder = self.item if where is None else where
        line = holder.line_of(index if index is not None else name) if hasattr(holder, "line_of") else self.item.line
        self.check.add(line, f"{self.key}.{name}", message)

    def present(self, name: str) -> bool:
        return name in self.item and self.item[name] is not None

    def choice(self, name: str, allowed: tuple[str, ...]) -> str | None:
        if not self.present(name):
            return None
        value = self.item[name]
        if not isinstance(value, str) or value not in allowed:
            self.bad(name, f"{shown(value)} is not one of {', '.join(allowed)}")
            return None
        return value

    def number(self, name: str, low: float, high: float, *, whole: bool = False, low_open: bool = False,
               holder: Any = None, path: str | None = None) -> float | None:
        """A finite number in [low, high] ((low, high] with low_open); ints of any length
        are compared as ints, so none is turned into a float before it is known to fit."""
        holder = self.item if holder is None else holder
        if name not in holder or holder[name] is None:
            return None
        value = holder[name]
        where = path or name
        bounds = f"{'above' if low_open else 'at least'} {low:,g} and at most {high:,.0f}"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            self.bad(where, f"must be {'a whole number' if whole else 'a number'} {bounds}, got {shown(value)}",
                     holder, name)
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self.bad(where, f"{value!r} is not a finite number: write one {bounds}", holder, name)
            return None
        too_low = value <= low if low_open else value < low
        if too_low or value > high:
            self.bad(where, f"{shown(value)} is out of range: must be {bounds}", holder, name)
            return None
        return float(value)

    def tags(self) -> tuple[str, ...] | None:
        if not self.present("tags"):
            return None
        value = self.item["tags"]
        if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
            self.bad("tags", "must be a non-empty list of tag names like [beta]")
            return None
        return tuple(value)

    def waves(self) -> tuple[Wave, ...]:
        if not self.present("waves"):
            return ()
        value = self.item["waves"]
        if not isinstance(value, list) or not value:
            self.bad("waves", "must be a list of {percent: N, success_percent: N, soak_minutes: N}")
            return ()
        if len(value) > MAX_WAVES:
            self.bad("waves", f"lists {len(value)} waves: at most {MAX_WAVES}; merge some")
            return ()
        waves: list[Wave] = []
        previous = 0.0
        for index, entry in enumerate(value):
            path = f"waves[{index}]"
            if not isinstance(entry, dict):
                self.bad(path, "must be a mapping like {percent: 5, success_percent: 95}", value, index)
                return ()
            for extra in set(entry) - {"percent", "success_percent", "soak_minutes"}:
                self.bad(f"{path}.{extra}", "unknown key; expected percent, success_percent, soak_minutes", entry, extra)
            if "percent" not in entry:
                self.bad(f"{path}.percent", "is required", value, index)
                return ()
            percent = self.number("percent", 0, 100, low_open=True, holder=entry, path=f"{path}.percent")
            success = self.number("success_percent", 0, 100, holder=entry, path=f"{path}.success_percent")
            soak = self.number("soak_minutes", 0, MAX_MINUTES, holder=entry, path=f"{path}.soak_minutes")
            if percent is None:
                return ()
            if percent <= previous:
                self.bad(f"{path}.percent", f"{percent:g} does not rise above the wave before ({previous:g}); "
                         "wave percents are cumulative", entry, "percent")
                return ()
            previous = percent
            waves.append(Wave(percent, success, soak or 0.0))
        return tuple(waves)

    def retry(self) -> RetryPolicy | None:
        if not self.present("retry"):
            return None
        value = self.item["retry"]
        if not isinstance(value, dict):
            self.bad("retry", "must be a mapping like {count: 2, interval_minutes: 10, on: [timeout]}")
            return None
        if True in value:  # YAML 1.1 reads the key `on` as true
            value["on"] = value.pop(True)
            if hasattr(value, "key_lines") and True in value.key_lines:
                value.key_lines["on"] = value.key_lines.pop(True)
        for extra in set(value) - {"count", "interval_minutes", "on"}:
            self.bad(f"retry.{extra}", "unknown key; expected count, interval_minutes, on", value, extra)
        if "count" not in value:
            self.bad("retry.count", "is required (how many retries per device)", value, "count")
        count = self.number("count", 1, MAX_RETRIES, whole=True, holder=value, path="retry.count")
        interval = self.number("interval_minutes", 0, MAX_MINUTES, holder=value, path="retry.interval_minutes")
        kinds: frozenset[str] = frozenset(FAILURE_KINDS)
        if value.get("on") is not None:
            on = value["on"]
            if not isinstance(on, list) or not on or not all(isinstance(k, str) for k in on):
                self.bad("retry.on", f"must be a list of failure kinds: {', '.join(FAILURE_KINDS)}", value, "on")
                return None
            unknown = sorted({k for k in on if k not in FAILURE_KINDS})
            if unknown:
                self.bad("retry.on", f"{', '.join(map(shown, unknown[:5]))} is not a failure kind; use "
                         f"{', '.join(FAILURE_KINDS)}", value, "on")
                return None
            kinds = frozenset(on)
        if count is None:
            return None
        return RetryPolicy(int(count), interval or 0.0, kinds)

    def time(self, name: str) -> float | None:
        if not self.present(name):
            return None
        value = self.item[name]
        if isinstance(value, dt.datetime):
            parsed = value
        elif isinstance(value, str):
            try:
                parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            except ValueError:
                parsed = None
        else:
            parsed = None
        if parsed is None or parsed.tzinfo is None or parsed.utcoffset() is None:
            self.bad(name, f"{shown(value)} is not an ISO 8601 time with an offset, like 2026-12-01T02:00:00+08:00")
            return None
        # Aware datetimes compare by the instant: no arithmetic that could leave datetime's years.
        if not EARLIEST <= parsed < LATEST:
            self.bad(name, f"{shown(value)} is out of range: must be from {format_time(EARLIEST.timestamp())} to "
                     f"before {format_time(LATEST.timestamp())} (leave {name} out for no limit)")
            return None
        return parsed.timestamp()

    def windows(self) -> tuple[Window, ...]:
        if not self.present("windows"):
            return ()
        value = self.item["windows"]
        if not isinstance(value, list) or not value:
            self.bad("windows", 'must be a list like [{cron: "0 2 * * *", minutes: 120, timezone: "+08:00"}]')
            return ()
        if len(value) > MAX_WINDOWS:
            self.bad("windows", f"lists {len(value)} windows: at most {MAX_WINDOWS}; a cron's lists and ranges "
                     "can say more in one window")
            return ()
        windows = []
        for index, entry in enumerate(value):
            path = f"windows[{index}]"
            if not isinstance(entry, dict):
                self.bad(path, 'must be a mapping like {cron: "0 2 * * *", minutes: 120}', value, index)
                continue
            for extra in set(entry) - {"cron", "minutes", "timezone"}:
                self.bad(f"{path}.{extra}", "unknown key; expected cron, minutes, timezone", entry, extra)
            cron_text = entry.get("cron")
            problem = cron_problem(cron_text)
            if problem is not None:
                self.bad(f"{path}.cron", problem, entry, "cron")
            if "minutes" not in entry:
                self.bad(f"{path}.minutes", "is required (how long each opening lasts)", entry, "cron")
            minutes = self.number("minutes", 0, MAX_WINDOW_MINUTES, low_open=True, holder=entry,
                                  path=f"{path}.minutes")
            offset = parse_offset(entry.get("timezone", "+00:00"))
            if offset is None:
                self.bad(f"{path}.timezone", f"{shown(entry.get('timezone'))} is not an offset like +08:00 or UTC",
                         entry, "timezone")
            cron = parse_cron(cron_text) if problem is None else None
            if cron is not None and minutes is not None and offset is not None:
                windows.append(Window(cron, minutes, offset))
        return tuple(windows)

    def abort(self) -> AbortRule | None:
        if not self.present("abort"):
            return None
        value = self.item["abort"]
        if not isinstance(value, dict):
            self.bad("abort", "must be a mapping like {failure_percent: 10, min_finished: 20}")
            return None
        for extra in set(value) - {"failure_percent", "min_finished"}:
            self.bad(f"abort.{extra}", "unknown key; expected failure_percent, min_finished", value, extra)
        if "failure_percent" not in value:
            self.bad("abort.failure_percent", "is required", value, "failure_percent")
        failure = self.number("failure_percent", 0, 100, low_open=True, holder=value, path="abort.failure_percent")
        minimum = self.number("min_finished", 1, MAX_MIN_FINISHED, whole=True, holder=value,
                              path="abort.min_finished")
        if failure is None:
            return None
        return AbortRule(failure, int(minimum) if minimum is not None else 1)


def parse_offset(text: Any) -> dt.timezone | None:
    if isinstance(text, int) and not isinstance(text, bool):  # YAML reads +0800 as a number
        if not -10_000 < text < 10_000:
            return None
        text = f"{text:+05d}"
    if not isinstance(text, str) or not _OFFSET_RE.match(text.strip()):
        return None
    text = text.strip()
    if text in ("UTC", "Z"):
        return dt.timezone.utc
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:])
    if hours > 14 or minutes > 59:
        return None
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


# The syntax accepted, checked before cronsim sees the text: numbers, `*`, ranges, lists and
# steps only. cronsim also reads names (MON, JAN), L, LW, # and a seconds field; those stay
# refused, so a catalog means the same to every cron a reader knows.
_CRON_ITEM = r"(?:\*|[0-9]+(?:-[0-9]+)?)(?:/[0-9]+)?"
_CRON_FIELD_RE = re.compile(rf"^{_CRON_ITEM}(?:,{_CRON_ITEM})*\Z")
_CRON_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_CRON_SYNTAX = ('is not a 5-field cron (minute hour day month weekday, numbers, *, ranges, lists and steps), '
                'like "0 2 * * *"')
# A fixed point for the "can it match at all" question: any match is within 50 years of
# it, for any cron of this syntax that matches at all (Feb 29 on a given weekday: every 40).
_CRON_PROBE = dt.datetime(2001, 1, 1, tzinfo=dt.timezone.utc)


def cron_problem(text: Any) -> str | None:
    """What is wrong with a window's cron, as the end of an error message; None when fine."""
    if not isinstance(text, str):
        return f"{shown(text)} {_CRON_SYNTAX}"
    if len(text) > MAX_CRON_CHARS:
        return f"is {len(text)} characters long: at most {MAX_CRON_CHARS}; use ranges and steps"
    parts = text.split()
    if len(parts) != 5 or not all(_CRON_FIELD_RE.match(part) for part in parts):
        return f"{shown(text)} {_CRON_SYNTAX}"
    for part, name in zip(parts, _CRON_NAMES):
        if part.count(",") >= MAX_CRON_ITEMS:
            return f"{shown(text)}: the {name} field lists {part.count(',') + 1} items: at most {MAX_CRON_ITEMS}; " \
                   "use ranges and steps"
    try:
        schedule = CronSim(text, _CRON_PROBE)
    except CronSimError as exc:
        if str(exc) == "Bad day-of-month" and _cron_reads(f"0 0 {parts[2]} * *"):  # the days are fine alone
            return f"{shown(text)} never matches: no month it lists has those days; pick days that exist " \
                   "(Feb has 29 at most, Apr, Jun, Sep and Nov 30)"
        return f"{shown(text)} {_CRON_SYNTAX} ({str(exc).lower()})"
    try:
        next(schedule)
    except StopIteration:
        return f"{shown(text)} never matches; pick days and months that meet"
    return None


def _cron_reads(text: str) -> bool:
    try:
        CronSim(text, _CRON_PROBE)
    except CronSimError:
        return False
    return True


def parse_cron(text: str) -> Cron | None:
    """A 5-field cron expression that can match, or None when it is not one."""
    if cron_problem(text) is not None:
        return None
    schedule = CronSim(text, _CRON_PROBE)
    return Cron(text, frozenset(schedule.minutes), frozenset(schedule.hours), frozenset(schedule.days),
                frozenset(schedule.months), frozenset(int(d) % 7 for d in schedule.weekdays))  # type: ignore[arg-type]
