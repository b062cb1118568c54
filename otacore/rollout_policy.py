"""A batch's rollout policy (the optional batch keys: state, tags, percent, waves,
rate_per_minute, retry, start_at, end_at, windows, abort): reading it from the catalog with
file:line errors, and the pure questions asked of it (who is in, is it open now, when next).

Time is always passed in (epoch seconds), never read here: the core's clock decides.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

FAILURE_KINDS = ("failed", "download", "verify", "flash", "timeout", "boot")
STEP_KINDS = {-1: "failed", -2: "download", -3: "verify", -4: "flash"}
_OFFSET_RE = re.compile(r"^(?:UTC|Z|[+-]\d{2}:?\d{2})\Z")


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
    """Five-field cron (minute hour day-of-month month day-of-week), numbers only."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day-of-month is `*`
    any_weekday: bool

    def matches(self, when: dt.datetime) -> bool:
        return when.minute in self.minutes and when.hour in self.hours and self._day(when)

    def _day(self, when: dt.datetime) -> bool:
        if when.month not in self.months:
            return False
        day_ok, weekday_ok = when.day in self.days, (when.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:  # cron: both restricted means either may match
            return day_ok and weekday_ok
        return day_ok or weekday_ok


@dataclass(frozen=True)
class Window:
    cron: Cron
    minutes: float
    offset: dt.timezone

    def open_at(self, now: float) -> float | None:
        """When the opening that covers `now` began, or None when `now` is outside."""
        local = dt.datetime.fromtimestamp(now, self.offset).replace(second=0, microsecond=0)
        for back in range(int(self.minutes) + 1):
            start = local - dt.timedelta(minutes=back)
            if self.cron.matches(start) and now < start.timestamp() + self.minutes * 60:
                return start.timestamp()
        return None

    def next_open(self, now: float) -> float | None:
        """The next opening after `now` (within a year), or None."""
        local = dt.datetime.fromtimestamp(now, self.offset).replace(second=0, microsecond=0)
        day = local.replace(hour=0, minute=0)
        for _ in range(367):
            if self.cron._day(day):
                for hour in sorted(self.cron.hours):
                    for minute in sorted(self.cron.minutes):
                        start = day.replace(hour=hour, minute=minute)
                        if start.timestamp() > now:
                            return start.timestamp()
            day = (day + dt.timedelta(days=1)).replace(hour=0, minute=0)
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
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- reading it from the catalog ------------------------------------------------------

class Checker(Protocol):
    def add(self, line: int, key: str, message: str) -> None: ...


POLICY_KEYS = {"state", "tags", "percent", "waves", "rate_per_minute", "retry", "start_at", "end_at", "windows",
               "abort"}


def read_policy(check: Checker, item: Any, key: str) -> RolloutPolicy:
    """The policy keys of one batch mapping (a yamlmarks.MarkedMap); problems go to `check`."""
    reader = _Reader(check, item, key)
    state = reader.choice("state", ("active", "paused"))
    tags = reader.tags()
    percent = reader.number("percent", 0, 100, low_open=True)
    waves = reader.waves()
    if percent is not None and waves:
        check.add(item.line_of("waves"), f"{key}.waves", "use either percent or waves, not both")
    rate = reader.number("rate_per_minute", 1, None, whole=True)
    retry = reader.retry()
    start_at, end_at = reader.time("start_at"), reader.time("end_at")
    if start_at is not None and end_at is not None and end_at <= start_at:
        check.add(item.line_of("end_at"), f"{key}.end_at", "is not after start_at; a batch must have time to run")
    windows = reader.windows()
    abort = reader.abort()
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
        if value not in allowed:
            self.bad(name, f"{value!r} is not one of {', '.join(allowed)}")
            return None
        return str(value)

    def number(self, name: str, low: float, high: float | None, *, whole: bool = False, low_open: bool = False,
               holder: Any = None, path: str | None = None) -> float | None:
        holder = self.item if holder is None else holder
        if name not in holder or holder[name] is None:
            return None
        value = holder[name]
        where = path or name
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            self.bad(where, f"must be {'a whole number' if whole else 'a number'}, got {value!r}", holder, name)
            return None
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high):
            bounds = f"{'above' if low_open else 'at least'} {low:g}" + (f" and at most {high:g}" if high is not None else "")
            self.bad(where, f"{value!r} is out of range: must be {bounds}", holder, name)
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
            soak = self.number("soak_minutes", 0, None, holder=entry, path=f"{path}.soak_minutes")
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
        count = self.number("count", 1, 100, whole=True, holder=value, path="retry.count")
        interval = self.number("interval_minutes", 0, None, holder=value, path="retry.interval_minutes")
        kinds: frozenset[str] = frozenset(FAILURE_KINDS)
        if value.get("on") is not None:
            on = value["on"]
            if not isinstance(on, list) or not on or not all(isinstance(k, str) for k in on):
                self.bad("retry.on", f"must be a list of failure kinds: {', '.join(FAILURE_KINDS)}", value, "on")
                return None
            unknown = [k for k in on if k not in FAILURE_KINDS]
            if unknown:
                self.bad("retry.on", f"{', '.join(map(repr, unknown))} is not a failure kind; use "
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
        if parsed is None or parsed.tzinfo is None:
            self.bad(name, f"{_plain(value)!r} is not an ISO 8601 time with an offset, like 2026-12-01T02:00:00+08:00")
            return None
        return parsed.timestamp()

    def windows(self) -> tuple[Window, ...]:
        if not self.present("windows"):
            return ()
        value = self.item["windows"]
        if not isinstance(value, list) or not value:
            self.bad("windows", 'must be a list like [{cron: "0 2 * * *", minutes: 120, timezone: "+08:00"}]')
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
            cron = parse_cron(cron_text) if isinstance(cron_text, str) else None
            if cron is None:
                self.bad(f"{path}.cron", f"{cron_text!r} is not a 5-field cron (minute hour day month weekday, "
                         'numbers, *, ranges, lists and steps), like "0 2 * * *"', entry, "cron")
            if "minutes" not in entry:
                self.bad(f"{path}.minutes", "is required (how long each opening lasts)", entry, "cron")
            minutes = self.number("minutes", 0, 7 * 24 * 60, low_open=True, holder=entry, path=f"{path}.minutes")
            offset = parse_offset(entry.get("timezone", "+00:00"))
            if offset is None:
                self.bad(f"{path}.timezone", f"{entry.get('timezone')!r} is not an offset like +08:00 or UTC",
                         entry, "timezone")
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
        minimum = self.number("min_finished", 1, None, whole=True, holder=value, path="abort.min_finished")
        if failure is None:
            return None
        return AbortRule(failure, int(minimum) if minimum is not None else 1)


def parse_offset(text: Any) -> dt.timezone | None:
    if isinstance(text, int) and not isinstance(text, bool):  # YAML reads +0800 as a number
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


_CRON_FIELDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def parse_cron(text: str) -> Cron | None:
    """A 5-field cron expression, or None when it is not one."""
    parts = text.split()
    if len(parts) != 5:
        return None
    sets = []
    for part, (low, high) in zip(parts, _CRON_FIELDS):
        values = _cron_field(part, low, high)
        if values is None:
            return None
        sets.append(values)
    weekdays = frozenset(v % 7 for v in sets[4])  # 7 is Sunday too
    return Cron(text, frozenset(sets[0]), frozenset(sets[1]), frozenset(sets[2]), frozenset(sets[3]), weekdays,
                parts[2] == "*", parts[4] == "*")


def _cron_field(part: str, low: int, high: int) -> set[int] | None:
    values: set[int] = set()
    for piece in part.split(","):
        body, _, step_text = piece.partition("/")
        if step_text and not (step_text.isascii() and step_text.isdigit() and int(step_text) > 0):
            return None
        step = int(step_text) if step_text else 1
        if body == "*":
            start, end = low, high
        elif "-" in body:
            first, _, last = body.partition("-")
            if not (first.isascii() and first.isdigit() and last.isascii() and last.isdigit()):
                return None
            start, end = int(first), int(last)
        elif body.isascii() and body.isdigit():
            start = int(body)
            end = high if step_text else start
        else:
            return None
        if not low <= start <= end <= high:
            return None
        values.update(range(start, end + 1, step))
    return values
