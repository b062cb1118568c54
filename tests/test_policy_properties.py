"""The rule of issue 13, "a careless catalog cannot take the fleet down", as a property: for
any values of a batch's rollout keys (well-formed or hostile: nan, inf, ints of hundreds of
digits, bools, text, times at the ends of datetime's years with -14:00/+14:00 offsets, crons
that never match or list everything, dozens of windows), `otactl validate`'s check either
refuses the catalog with one-line file:line errors, or the server runs it: the rollout tick at
times around its start and end, a device's version report, the status the console and
`otactl status` read, `otactl plan` and the metrics text all answer, fast.

The core is driven as tests/test_rollout.py drives it (support.world.World, a fake clock);
status reads the World's memory through a stand-in for the database's reads.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings, strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from fileserver.metrics import BrokerFigures, OtaCollector
from support.harness import write_catalog
from otacore.catalog.loading import prepare_catalog
from otacore.decisions import admin, ticks
from otacore.errors import ConfigError
from otacore.cli.plan import plan_reload
from otacore.catalog.rollout_policy import EARLIEST, LATEST
from otacore.config.settings import settings_from_mapping
from otacore.views.fleet_figures import fleet_figures
from otacore.views.status import FleetView, batch_report, batch_summaries
from support.world import BASE, T0, World

DEVICES = [f"d{i}" for i in range(4)]
UTC = dt.timezone.utc
OFFSETS = [dt.timezone(dt.timedelta(hours=h, minutes=m)) for h, m in ((-14, 0), (-5, -30), (0, 0), (8, 0), (14, 0))]

# -- strategies -----------------------------------------------------------------------------

BOUNDS = [0, 1, 2, 10, 100, 100.0000001, 10080, 10080.5, 525_600, 525_601, 1_000_000, 1_000_001, 10_000_000,
          10_000_001, -0.0, -1, 5e-324, 1.7976931348623157e308]
numbers = st.one_of(
    st.integers(min_value=-10, max_value=2_000),
    st.sampled_from(BOUNDS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=10 ** 15, max_value=10 ** 60),
    st.just(10 ** 400),  # "1 followed by 400 zeros"
    st.just(-(10 ** 400)),
    st.booleans(),
    st.sampled_from(["10", "", "ten", None]),
)
small_numbers = st.one_of(st.integers(min_value=0, max_value=120), st.floats(min_value=0.01, max_value=120))

EXTREME_TIMES = ["9999-12-31T23:00:00-14:00", "0001-01-01T00:00:00+14:00", "1999-12-31T23:59:59Z",
                 "2000-01-01T00:00:00Z", "2000-01-01T00:00:00+14:00", "8999-12-31T23:59:59Z",
                 "8999-12-31T23:59:59-14:00", "9000-01-01T00:00:00Z", "9999-12-31T23:59:59.999999+00:00",
                 "2026-12-01T02:00:00", "not a time", "2026-12-01"]
near_now = st.floats(min_value=T0 - 3 * 86_400, max_value=T0 + 3 * 86_400).map(
    lambda epoch: dt.datetime.fromtimestamp(epoch, UTC).replace(microsecond=0))
any_instant = st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30),
                           timezones=st.sampled_from(OFFSETS))
times = st.one_of(
    st.sampled_from(EXTREME_TIMES),
    near_now.map(lambda t: t.isoformat()),
    near_now,  # written as a YAML timestamp, unquoted
    any_instant,
    any_instant.map(lambda t: t.isoformat()),
    numbers,
)


def cron_field(low: int, high: int) -> st.SearchStrategy[str]:
    number = st.integers(min_value=low - 1, max_value=high + 1).map(str)
    item = st.one_of(
        st.just("*"),
        number,
        st.tuples(number, number).map(lambda p: f"{p[0]}-{p[1]}"),
        st.tuples(st.sampled_from(["*", str(low)]), st.integers(min_value=0, max_value=high + 2))
        .map(lambda p: f"{p[0]}/{p[1]}"),
    )
    return st.lists(item, min_size=1, max_size=4).map(",".join)


crons = st.one_of(
    st.tuples(cron_field(0, 59), cron_field(0, 23), cron_field(1, 31), cron_field(1, 12), cron_field(0, 7))
    .map(" ".join),
    st.sampled_from(["0 2 * * *", "* * * * *", "0 0 1 1 *", "0 0 29 2 *", "0 0 29 2 */7", "0 0 31 2 *",
                     "0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 31 2 5", "0 0 * * MON", "@daily", "0 0 L * *",
                     "0 0 * * 1#2", "0 0 0 * * *", "0 2 * *", "", "*/0 * * * *",
                     ",".join(str(m) for m in range(60)) + " * * * *",
                     ",".join("1" for _ in range(61)) + " * * * *", "0 0 1 1 *" + " " * 300]),
    st.text(max_size=30),
    numbers,
)
timezones = st.sampled_from(["+08:00", "UTC", "Z", "-14:00", "+14:00", "+14:30", "-05:30", "+0800", 800, -1400,
                             "Asia/Shanghai", 10 ** 30, True, None])
window = st.fixed_dictionaries({"cron": crons}, optional={
    "minutes": st.one_of(numbers, small_numbers, st.sampled_from([10080, 10080.01, 1e-300])),
    "timezone": timezones})
windows = st.one_of(st.lists(window, min_size=1, max_size=4), st.lists(window, max_size=30),
                    st.integers(min_value=0, max_value=300).map(
                        lambda n: [{"cron": "0 0 1 1 *", "minutes": 10080}] * n))
wave = st.fixed_dictionaries({"percent": st.one_of(numbers, st.floats(min_value=0, max_value=100))}, optional={
    "success_percent": st.one_of(numbers, st.floats(min_value=0, max_value=100)),
    "soak_minutes": st.one_of(numbers, small_numbers)})
rising_waves = st.lists(st.floats(min_value=0.5, max_value=100), min_size=1, max_size=30, unique=True).map(
    lambda percents: [{"percent": p, "soak_minutes": 1} for p in sorted(percents)])
retry = st.fixed_dictionaries({}, optional={
    "count": st.one_of(numbers, st.integers(min_value=1, max_value=3)),
    "interval_minutes": st.one_of(numbers, small_numbers),
    "on": st.one_of(st.just(["timeout", "download"]), st.lists(st.text(max_size=8), max_size=3), numbers)})
abort = st.fixed_dictionaries({}, optional={
    "failure_percent": st.one_of(numbers, st.floats(min_value=0, max_value=100)),
    "min_finished": st.one_of(numbers, st.integers(min_value=1, max_value=5))})
HOSTILE = {
    "state": st.sampled_from(["active", "paused", "stopped", 1, True]),
    "tags": st.one_of(st.just(["beta"]), st.lists(st.text(max_size=5), max_size=3), numbers),
    "percent": st.one_of(numbers, st.floats(min_value=0, max_value=100)),
    "waves": st.one_of(st.lists(wave, max_size=5), rising_waves),
    "rate_per_minute": st.one_of(numbers, st.integers(min_value=1, max_value=3)),
    "retry": retry,
    "start_at": times,
    "end_at": times,
    "windows": windows,
    "abort": abort,
    "timeout_minutes": st.one_of(numbers, st.integers(min_value=1, max_value=10)),
}
hostile_policies = st.fixed_dictionaries({}, optional=HOSTILE)


# Well-formed values, at and near the documented bounds, so that many examples are accepted
# and the server's side runs on them.
def in_range(low: float, high: float, *, whole: bool = False, low_open: bool = False) -> st.SearchStrategy[Any]:
    first = low + 1 if whole and low_open else low
    edges = st.sampled_from([high] if low_open else [low, high])
    if whole:
        return st.one_of(st.integers(min_value=int(first), max_value=int(high)), edges)
    return st.one_of(st.floats(min_value=low, max_value=high, exclude_min=low_open), edges,
                     st.integers(min_value=int(first) + low_open, max_value=int(high)))


def sane_field(low: int, high: int) -> st.SearchStrategy[str]:
    number = st.integers(min_value=low, max_value=high)
    item = st.one_of(
        st.just("*"),
        number.map(str),
        st.tuples(number, number).map(lambda p: f"{min(p)}-{max(p)}"),
        st.tuples(st.sampled_from(["*", str(low)]), st.integers(min_value=1, max_value=high + 1))
        .map(lambda p: f"{p[0]}/{p[1]}"),
    )
    return st.lists(item, min_size=1, max_size=3).map(",".join)


sane_cron = st.tuples(sane_field(0, 59), sane_field(0, 23), sane_field(1, 31), sane_field(1, 12),
                      sane_field(0, 7)).map(" ".join)
sane_window = st.fixed_dictionaries({"cron": st.one_of(sane_cron, st.sampled_from(["0 0 29 2 *", "* * * * *"])),
                                     "minutes": in_range(0, 10080, low_open=True)},
                                    optional={"timezone": st.sampled_from(["+08:00", "UTC", "Z", "-14:00", "+14:00"])})
EDGE_TIMES = [EARLIEST, LATEST - dt.timedelta(seconds=1), dt.datetime(2000, 1, 1, 14, tzinfo=OFFSETS[-1]),
              dt.datetime(8999, 12, 31, 9, 59, 59, tzinfo=OFFSETS[0])]
sane_time = st.one_of(near_now, st.sampled_from(EDGE_TIMES),
                      st.datetimes(min_value=dt.datetime(2000, 1, 2), max_value=dt.datetime(8999, 12, 30),
                                   timezones=st.sampled_from(OFFSETS)))
sane_schedule = st.one_of(
    st.just({}),
    sane_time.map(lambda t: {"start_at": t.isoformat()}),
    sane_time.map(lambda t: {"end_at": t}),
    st.tuples(sane_time, st.floats(min_value=1, max_value=10 * 86_400)).filter(
        lambda p: p[0] + dt.timedelta(seconds=p[1]) < LATEST).map(
        lambda p: {"start_at": p[0], "end_at": (p[0] + dt.timedelta(seconds=p[1])).isoformat()}),
)
sane_share = st.one_of(st.just({}), in_range(0, 100, low_open=True).map(lambda p: {"percent": p}),
                       rising_waves.map(lambda waves: {"waves": waves[:24]}))
sane = st.tuples(st.fixed_dictionaries({}, optional={
    "state": st.sampled_from(["active", "paused"]),
    "rate_per_minute": in_range(1, 1_000_000, whole=True),
    "retry": st.fixed_dictionaries({"count": in_range(1, 100, whole=True)}, optional={
        "interval_minutes": in_range(0, 525_600), "on": st.just(["download", "timeout"])}),
    "windows": st.lists(sane_window, min_size=1, max_size=24),
    "abort": st.fixed_dictionaries({"failure_percent": in_range(0, 100, low_open=True)}, optional={
        "min_finished": in_range(1, 10_000_000, whole=True)}),
    "timeout_minutes": in_range(1, 525_600, whole=True),
}), sane_schedule, sane_share).map(lambda parts: {**parts[0], **parts[1], **parts[2]})
one_hostile_key = st.sampled_from(sorted(HOSTILE)).flatmap(lambda key: HOSTILE[key].map(lambda value: {key: value}))
policies = st.one_of(hostile_policies, sane, st.tuples(sane, one_hostile_key).map(lambda p: {**p[0], **p[1]}))


# -- the server's readers, outside a server ----------------------------------------------------

def metrics_text(w: World) -> str:
    engine = SimpleNamespace(figures=lambda: fleet_figures(w.live, 0, {}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OtaCollector(engine, BrokerFigures(), {}))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


async def console_json(w: World, now: float) -> str:
    """What /admin/api/status and /admin/api/batches/up answer, as strict JSON."""
    store = FleetView(w.state)  # what the server's admin API reads
    summaries = await batch_summaries(store, w.live.catalog, now=now)  # type: ignore[arg-type]
    report = await batch_report(store, w.live.catalog, "up")  # type: ignore[arg-type]
    return json.dumps({"batches": summaries, "report": report, "rollout": admin.rollout_view(w.live, "up")},
                      allow_nan=False)


def moments(policy: dict[str, Any], catalog_policy: Any) -> list[float]:
    """Times to drive the tick at: now-ish, and around start_at and end_at when they are set."""
    at = [T0, T0 + 61, T0 + 3_600]
    for edge in (catalog_policy.start_at, catalog_policy.end_at):
        if edge is not None:
            at += [edge - 1, edge, edge + 0.5, edge + 61]
    return sorted({t for t in at if t >= T0})


# -- the property ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("policy")


def batch_yaml(policy: dict[str, Any]) -> str:
    entry = {"name": "up", "package": "fw-1.1.0", "mode": "dynamic", "push": True, **policy}
    return yaml.safe_dump([entry], sort_keys=False, width=1 << 20, allow_unicode=False)


@settings(max_examples=300, deadline=dt.timedelta(seconds=1), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(policy=policies)
def test_what_validate_accepts_the_server_runs(root: Path, policy: dict[str, Any]) -> None:
    write_catalog(root, batch_yaml(policy), base=BASE)
    settings_ = settings_from_mapping({"data_dir": str(root / "var")}, root / "broker.yaml")
    try:
        loaded = prepare_catalog(settings_)  # what `otactl validate` runs
    except ConfigError as error:
        event("refused")
        assert error.issues
        for issue in error.issues:
            text = str(issue)
            assert "\n" not in text and text.startswith(f"{root / 'ota.yaml'}:{issue.line}: ") and issue.line > 0, text
            assert len(text) < 400, text
        return
    catalog_policy = loaded.catalog.batches["up"].policy
    event("accepted")
    assert all(EARLIEST.timestamp() <= t < LATEST.timestamp()
               for t in (catalog_policy.start_at, catalog_policy.end_at) if t is not None)

    w = World(root, batch_yaml(policy))
    w.online |= set(DEVICES)
    w.report(DEVICES[0], "1.0.0")
    for index, now in enumerate(moments(policy, catalog_policy)):
        w.now = now
        w.step(ticks.rollout_tick, w.live)
        w.report(DEVICES[(index + 1) % len(DEVICES)], "1.0.0")
        if w.job(DEVICES[0]) is not None and w.job(DEVICES[0]).is_open:
            w.progress(DEVICES[0], -2, "download failed")  # a failure for retry and abort to see
        view = admin.rollout_view(w.live, "up")
        assert view is not None and view["state"] in ("active", "paused", "halted", "scheduled", "ended",
                                                      "outside_window", "rate_limited"), view
        json.dumps(view, allow_nan=False)
        asyncio.run(console_json(w, now))
        assert "ota_batch_rollout_state" in metrics_text(w)
        lines = plan_reload(w.live.catalog, w.state, {})
        assert [line.batch for line in lines] == ["up"] and all(str(line) for line in lines)
