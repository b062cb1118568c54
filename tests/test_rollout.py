"""Rollout policies on the decisions (LiveFleet + Rollout) with a fake clock: pause and resume, the
catalog's `state:`, tags, percent, waves, rate, retry, abort, schedule, windows, the view, and
the catalog's errors for each key. Every step is checked by support.world.World's invariants."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from support.world import BASE, C, F, N, Q, S, T0, World

from otacore.catalog.model import load_catalog
from otacore.decisions import admin, ticks
from otacore.errors import ConfigError, Refused
from otacore.catalog import rollout_policy
from otacore.catalog.rollout_policy import Cron, RolloutPolicy, device_share, parse_cron, parse_offset, schedule_block, Window
from otacore.config.settings import settings_from_mapping
from support.harness import write_catalog


def batch(**keys: str) -> str:
    lines = ["- name: up", "  package: fw-1.1.0", "  mode: dynamic", "  push: true"]
    lines += [f"  {key}: {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def tick(w: World, seconds: float = 0) -> list:
    w.now += seconds
    return w.step(ticks.rollout_tick, w.live).sends


def pushed(sends: list) -> set[str]:
    return {send.device.device_name for send in sends if "/ota/device/upgrade/" in send.topic}


def names(count: int, prefix: str = "d") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(count)]


# -- pause and resume ---------------------------------------------------------------------------

def test_a_paused_batch_starts_nothing_and_resumes_where_it_was(tmp_path: Path) -> None:
    w = World(tmp_path, batch())
    w.online |= {"d1", "d2", "d3"}
    assert pushed(w.report("d1", "1.0.0").sends) == {"d1"}
    w.step(admin.pause, w.live, "up")
    assert w.report("d2", "1.0.0").sends == [] and w.job("d2") is None  # no new job
    assert w.offer("d3").result == {}  # asking: "no upgrade"
    assert w.offer("d1").result["version"] == "1.1.0"  # a notified job goes on
    w.progress("d1", 50)
    assert w.job("d1").state.value == "in_progress"
    assert tick(w, 5) == []
    view = admin.rollout_view(w.live, "up")
    assert view["state"] == "paused" and view["paused_by"] == "admin"
    sends = w.step(admin.resume, w.live, "up").sends  # d2 and d3 reported while paused: their jobs now
    assert pushed(sends) == {"d2"}  # d3 never reported a version (it only asked)
    assert w.job("d2").state == N


def test_pause_and_resume_refuse_unknown_or_finished_batches(tmp_path: Path) -> None:
    w = World(tmp_path, batch())
    with pytest.raises(Refused) as refused:
        admin.pause(w.live, "nope")
    assert refused.value.status == 404


def test_the_catalogs_state_and_a_pause_by_hand_the_latest_wins(tmp_path: Path) -> None:
    w = World(tmp_path, batch(state="paused"))
    w.online.add("d1")
    assert w.report("d1", "1.0.0").sends == []
    assert admin.rollout_view(w.live, "up")["paused_by"] == "catalog"
    w.step(admin.resume, w.live, "up")  # by hand
    assert w.job("d1").state == N
    w.reload(batch(state="paused"))  # the file's state did not change: the resume by hand stands
    assert admin.rollout_view(w.live, "up")["state"] == "active"
    w.reload(batch(state="active"))
    w.reload(batch(state="paused"))  # changed in the file: it wins
    assert admin.rollout_view(w.live, "up")["state"] == "paused"


# -- who is in -----------------------------------------------------------------------------------

TAGGED = BASE.replace("""    modules:
      - name: MCU
""", """    modules:
      - name: MCU
    devices:
      - {name: b1, tags: [beta]}
      - {name: b2, tags: [beta, lab]}
      - {name: p1, tags: [prod]}
      - {name: p2}
""")


def test_tags_choose_devices_listed_with_one_of_them(tmp_path: Path) -> None:
    w = World(tmp_path, batch(tags="[beta]"), base=TAGGED)
    w.online |= {"b1", "b2", "p1", "p2"}
    got = set()
    for name in ("b1", "b2", "p1", "p2"):
        got |= pushed(w.report(name, "1.0.0").sends)
    assert got == {"b1", "b2"}


def test_percent_is_a_stable_share_and_raising_it_only_adds_devices() -> None:
    fleet = names(2000)
    chosen = {p: {d for d in fleet if device_share("up", d) < p} for p in (5, 25, 60, 100)}
    assert chosen[5] <= chosen[25] <= chosen[60] <= chosen[100] == set(fleet)
    assert 0.03 < len(chosen[5]) / 2000 < 0.07 and 0.22 < len(chosen[25]) / 2000 < 0.28
    assert {d for d in fleet if device_share("other", d) < 5} != chosen[5]  # independent per batch


def test_percent_over_the_core_and_raised_by_a_reload(tmp_path: Path) -> None:
    w = World(tmp_path, batch(percent="20"))
    fleet = names(200)
    w.online |= set(fleet)
    for name in fleet:
        w.report(name, "1.0.0")
    first = {name for name in fleet if w.job(name) is not None}
    assert first == {d for d in fleet if device_share("up", d) < 20}
    w.reload(batch(percent="50"))
    tick(w, 1)  # the reload lets the tick look at everyone again
    second = {name for name in fleet if w.job(name) is not None}
    assert first < second == {d for d in fleet if device_share("up", d) < 50}


def test_waves_open_one_after_another_on_success_and_soak(tmp_path: Path) -> None:
    waves = "[{percent: 10, success_percent: 90, soak_minutes: 2}, {percent: 40, success_percent: 90}, {percent: 100}]"
    w = World(tmp_path, batch(waves=waves))
    fleet = names(100)
    w.online |= set(fleet)
    for name in fleet:
        w.report(name, "1.0.0")
    wave1 = {n for n in fleet if w.job(n) is not None}
    assert wave1 == {n for n in fleet if device_share("up", n) < 10} and wave1
    assert "waiting for 90% succeeded to open wave 2" in admin.rollout_view(w.live, "up")["reason"]
    for name in wave1:
        w.report(name, "1.1.0")  # all upgraded
    assert tick(w, 1) == []  # condition met now; soaking for 2 minutes
    assert "soaking" in admin.rollout_view(w.live, "up")["reason"]
    assert tick(w, 60) == []
    sends = tick(w, 61)
    wave2 = {n for n in fleet if device_share("up", n) < 40} - wave1
    assert pushed(sends) == wave2
    view = admin.rollout_view(w.live, "up")
    assert view["wave"] == 2 and [x["open"] for x in view["waves"]] == [True, True, False]
    # Wave 2: one failure in 31+ jobs is under 10%: wave 3 opens without soak.
    for i, name in enumerate(sorted(wave2)):
        if i == 0:
            w.progress(name, -2, "download failed")
        else:
            w.report(name, "1.1.0")
    sends = tick(w, 1)
    assert pushed(sends) == set(fleet) - wave1 - wave2


# -- rate, retry, abort ---------------------------------------------------------------------------

def test_rate_per_minute_starts_at_most_that_many_and_queues_the_rest(tmp_path: Path) -> None:
    w = World(tmp_path, batch(rate_per_minute="5"))
    fleet = names(12)
    w.online |= set(fleet)
    sent = set()
    for name in fleet:
        sent |= pushed(w.report(name, "1.0.0").sends)
    assert len(sent) == 5 and sum(w.job(n).state == Q for n in fleet) == 7
    assert w.offer(sorted(set(fleet) - sent)[0]).result == {}  # asking does not jump the queue
    assert admin.rollout_view(w.live, "up")["state"] == "rate_limited"
    assert tick(w, 30) == []
    sent2 = pushed(tick(w, 31))
    assert len(sent2) == 5 and not sent2 & sent
    assert len(pushed(tick(w, 61))) == 2


def test_retry_makes_a_new_job_after_the_interval_for_listed_kinds_only(tmp_path: Path) -> None:
    w = World(tmp_path, batch(retry="{count: 1, interval_minutes: 1, on: [download]}"))
    w.online |= {"d1", "d2"}
    w.report("d1", "1.0.0")
    w.report("d2", "1.0.0")
    first = w.job("d1")
    w.progress("d1", -2, "download failed")
    w.progress("d2", -4, "flash failed")  # not a listed kind
    assert tick(w, 30) == []
    sends = tick(w, 31)
    assert pushed(sends) == {"d1"}
    second = w.job("d1")
    assert second.id != first.id and w.state.jobs[first.id].state == F  # history keeps the failed one
    w.progress("d1", -2, "download failed again")
    assert tick(w, 120) == []  # count 1: no third job
    assert w.job("d2").state == F


def test_abort_halts_at_the_failure_share_and_resume_goes_on(tmp_path: Path) -> None:
    w = World(tmp_path, batch(abort="{failure_percent: 50, min_finished: 2}"))
    fleet = names(6)
    w.online |= set(fleet)
    for name in fleet[:3]:
        w.report(name, "1.0.0")
    w.progress(fleet[0], -1, "bad")
    assert admin.rollout_view(w.live, "up")["state"] == "active"  # 1 finished < min_finished
    w.progress(fleet[1], -3, "bad")
    view = admin.rollout_view(w.live, "up")
    assert view["state"] == "halted" and "2 of 2 finished jobs failed" in view["reason"]
    assert view["figures"] == {"failed": 2, "finished": 2, "failure_percent": 100.0}
    assert w.report(fleet[3], "1.0.0").sends == []  # no new jobs while halted
    w.reload(batch(abort="{failure_percent: 50, min_finished: 2}"))  # a reload does not undo a halt
    assert admin.rollout_view(w.live, "up")["state"] == "halted"
    sends = w.step(admin.resume, w.live, "up").sends
    assert pushed(sends) == {fleet[3]}
    assert admin.rollout_view(w.live, "up")["state"] == "active"  # the failures it was halted for do not halt it again
    w.progress(fleet[2], -1, "bad")  # a new failure over the threshold: halted again
    assert admin.rollout_view(w.live, "up")["state"] == "halted"


# -- time: schedule and windows ---------------------------------------------------------------

def iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat()


def test_start_at_and_end_at(tmp_path: Path) -> None:
    w = World(tmp_path, batch(start_at=f'"{iso(T0 + 120)}"', end_at=f'"{iso(T0 + 600)}"', rate_per_minute="1"))
    w.online |= {"d1", "d2", "d3"}
    assert w.report("d1", "1.0.0").sends == [] and w.job("d1") is None
    assert admin.rollout_view(w.live, "up")["state"] == "scheduled"
    assert pushed(tick(w, 121)) == {"d1"}  # its turn came: pushed, as it is online
    w.report("d2", "1.0.0")
    w.report("d3", "1.0.0")
    assert sum(w.job(n) is not None and w.job(n).state == Q for n in ("d2", "d3")) == 2  # rate: queued
    w.now = T0 + 601
    assert tick(w) == []
    assert w.job("d2").state == C and w.job("d3").state == C  # never started: canceled at end_at
    assert admin.rollout_view(w.live, "up")["state"] == "ended"
    assert w.report("d4", "1.0.0").sends == [] and w.job("d4") is None


def test_windows_allow_new_jobs_only_inside(tmp_path: Path) -> None:
    start = dt.datetime.fromtimestamp(T0, dt.timezone.utc)
    cron = f"{(start.minute + 10) % 60} * * * *"  # opens 10 minutes after T0 (hourly)
    w = World(tmp_path, batch(windows=f'[{{cron: "{cron}", minutes: 5, timezone: "+00:00"}}]'))
    w.online.add("d1")
    assert w.report("d1", "1.0.0").sends == []
    view = admin.rollout_view(w.live, "up")
    assert view["state"] == "outside_window" and view["until"] is not None
    w.now = T0 + 10 * 60 - start.second + 1
    assert pushed(tick(w)) == {"d1"}


def test_window_arithmetic() -> None:
    window = Window(parse_cron("0 2 * * *"), 120, parse_offset("+08:00"))
    at_3 = dt.datetime(2026, 12, 1, 3, 0, tzinfo=parse_offset("+08:00")).timestamp()
    assert window.open_at(at_3) == at_3 - 3600
    assert window.open_at(at_3 + 3600) is None  # 04:00: the two hours are over
    assert window.next_open(at_3) == at_3 + 23 * 3600
    assert parse_cron("*/15 1-3 * * 1-5").minutes == {0, 15, 30, 45}
    for bad in ("0 25 * * *", "61 * * * *", "0 2 * *", "a b c d e", "*/0 * * * *", "5-1 * * * *"):
        assert parse_cron(bad) is None


def test_window_edges_and_the_day_rule() -> None:
    utc = parse_offset("UTC")
    at = dt.datetime(2026, 12, 1, 2, 0, tzinfo=utc).timestamp()  # a Tuesday
    window = Window(parse_cron("0 2 * * *"), 30, utc)
    assert window.open_at(at) == at and window.open_at(at - 0.5) is None  # the opening minute counts
    assert window.open_at(at + 30 * 60 - 0.001) == at and window.open_at(at + 30 * 60) is None
    assert window.next_open(at) == at + 86_400 and window.next_open(at - 0.5) == at
    # Day-of-month and day-of-week both restricted: either may match (cron's rule) ...
    either = Window(parse_cron("0 2 15 * 2"), 30, utc)
    assert either.open_at(at) == at  # a Tuesday, not the 15th
    # ... one of them starting with `*`: both must (`*/2`, odd days, too: as in Vixie and Debian cron).
    both = Window(parse_cron("0 2 */2 * 2"), 30, utc)
    assert both.open_at(at) == at  # the 1st is odd
    assert both.open_at(at + 7 * 86_400) is None  # Tuesday the 8th is not
    assert parse_cron("0 0 * * 7").weekdays == parse_cron("0 0 * * 0").weekdays == {0}  # both Sunday
    # A leap day is found by the fields, not by walking: the next is years away.
    leap = Window(parse_cron("0 0 29 2 *"), 60, utc)
    assert leap.next_open(at) == dt.datetime(2028, 2, 29, tzinfo=utc).timestamp()
    assert leap.open_at(at) is None


def test_windows_cost_does_not_grow_with_minutes_or_their_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """300 week-long windows (more than a catalog may list): each asks cronsim for its last
    and next opening once, and then keeps them until the next opening."""
    calls = []
    real = rollout_policy.CronSim

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(rollout_policy, "CronSim", counted)
    windows = tuple(Window(parse_cron("0 0 1 1 *"), 10080, parse_offset("+08:00")) for _ in range(300))
    policy = RolloutPolicy(windows=windows)
    calls.clear()  # parse_cron's own checks
    outside = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc).timestamp()
    reason, until = schedule_block(policy, outside)
    assert reason.startswith("outside its window") and until == dt.datetime(
        2027, 1, 1, tzinfo=parse_offset("+08:00")).timestamp()
    assert len(calls) == 2 * 300
    for later in (1, 60, 86_400, 30 * 86_400):
        assert schedule_block(policy, outside + later) is not None
    assert len(calls) == 2 * 300  # nothing new until the next opening
    assert schedule_block(policy, until + 60) is None  # inside: the first window answers
    assert len(calls) == 2 * 300 + 2


def test_a_cron_that_never_matches_costs_nothing_at_run_time() -> None:
    # Refused when read (below); built by hand, it answers "never" and remembers that.
    nothing: frozenset[int] = frozenset()
    never = Window(Cron("0 0 31 2 *", nothing, nothing, nothing, nothing, nothing), 10, parse_offset("UTC"))
    assert never.open_at(T0) is None and never.next_open(T0) is None
    assert never._span[1] == float("inf")
    assert schedule_block(RolloutPolicy(windows=(never,)), T0) == ("outside its window", None)


# -- the catalog ---------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, expected", [
    ({"windows": '[{cron: "0 25 * * *", minutes: 60}]'}, "windows[0].cron: '0 25 * * *' is not a 5-field cron"),
    ({"start_at": '"2026-12-08T00:00:00+08:00"', "end_at": '"2026-12-01T00:00:00+08:00"'}, "end_at: is not after start_at"),
    ({"start_at": '"2026-12-08T00:00:00"'}, "is not an ISO 8601 time with an offset"),
    ({"waves": "[{percent: 30}, {percent: 10}]"}, "waves[1].percent: 10 does not rise above the wave before (30)"),
    ({"retry": "{count: 2, on: [timeout, reboot]}"}, "retry.on: 'reboot' is not a failure kind"),
    ({"percent": "0"}, "percent: 0 is out of range"),
    ({"percent": "10", "waves": "[{percent: 50}]"}, "use either percent or waves"),
    ({"rate_per_minute": "1.5"}, "rate_per_minute: must be a whole number"),
    ({"state": "stopped"}, "state: 'stopped' is not one of active, paused"),
    ({"abort": "{failure_percent: 150}"}, "abort.failure_percent: 150 is out of range"),
    ({"windows": '[{cron: "0 2 * * *", minutes: 60, timezone: "Asia/Shanghai"}]'}, "is not an offset like +08:00"),
    ({"windows": '[{cron: "0 2 * * MON", minutes: 60}]'}, "is not a 5-field cron"),  # cronsim reads names; we do not
    ({"windows": '[{cron: "@daily", minutes: 60}]'}, "is not a 5-field cron"),
    ({"windows": '[{cron: "0 2 L * *", minutes: 60}]'}, "is not a 5-field cron"),
])
def test_bad_policy_keys_are_file_line_errors(tmp_path: Path, keys: dict[str, str], expected: str) -> None:
    write_catalog(tmp_path, batch(**keys), base=BASE)
    settings = settings_from_mapping({"data_dir": str(tmp_path / "var")}, tmp_path / "broker.yaml")
    with pytest.raises(ConfigError) as error:
        load_catalog(tmp_path / "ota.yaml", settings)
    text = str(error.value)
    assert expected in text, text
    assert f"{tmp_path / 'ota.yaml'}:" in text and "batches[0]." in text


# Issue 13's red team: each of these passed `otactl validate` and then made status, metrics and
# the console answer 500 (or stall the event loop) after a reload.
RED_TEAM = [
    ({"start_at": '"9999-12-31T23:00:00-14:00"'}, "start_at", "is out of range: must be from 2000-01-01T00:00:00Z"),
    ({"start_at": "9999-12-31T23:00:00-14:00"}, "start_at", "is out of range"),  # a YAML timestamp, unquoted
    ({"end_at": '"0001-01-01T00:00:00+14:00"'}, "end_at", "is out of range: must be from 2000-01-01T00:00:00Z"),
    ({"end_at": '"8999-12-31T23:59:59-14:00"'}, "end_at", "is out of range"),  # 9000-01-01T13:59:59Z
    ({"windows": '[{cron: "* * * * *", minutes: .nan}]'}, "windows[0].minutes", "nan is not a finite number"),
    ({"waves": "[{percent: 10, soak_minutes: .inf}, {percent: 100}]"}, "waves[0].soak_minutes",
     "inf is not a finite number"),
    ({"retry": "{count: 1, interval_minutes: .nan}"}, "retry.interval_minutes", "nan is not a finite number"),
    ({"rate_per_minute": "1" + "0" * 400}, "rate_per_minute",
     "a number of about 401 digits is out of range: must be at least 1 and at most 1,000,000"),
    ({"windows": "[" + ", ".join(['{cron: "0 0 31 2 *", minutes: 10080}'] * 300) + "]"}, "windows",
     "lists 300 windows: at most 24"),
    ({"windows": '[{cron: "0 0 31 2 *", minutes: 10080}]'}, "windows[0].cron", "'0 0 31 2 *' never matches"),
    ({"windows": '[{cron: "0 0 30 2 *", minutes: 60}]'}, "windows[0].cron", "'0 0 30 2 *' never matches"),
    # The same class of value in the other keys.
    ({"percent": ".nan"}, "percent", "nan is not a finite number"),
    ({"waves": "[{percent: .nan}]"}, "waves[0].percent", "nan is not a finite number"),
    ({"abort": "{failure_percent: 10, min_finished: 10000001}"}, "abort.min_finished", "at most 10,000,000"),
    ({"retry": "{count: 1, interval_minutes: 525601}"}, "retry.interval_minutes", "at most 525,600"),
    ({"rate_per_minute": "true"}, "rate_per_minute", "must be a whole number at least 1 and at most 1,000,000"),
    ({"waves": "[" + ", ".join(f"{{percent: {p}}}" for p in range(1, 26)) + "]"}, "waves",
     "lists 25 waves: at most 24"),
    ({"windows": '[{cron: "' + ",".join(["1"] * 61) + ' * * * *", minutes: 5}]'}, "windows[0].cron",
     "the minute field lists 61 items: at most 60"),
    ({"windows": '[{cron: "0 2 * * *' + " " * 200 + '", minutes: 5}]'}, "windows[0].cron",
     "characters long: at most 200"),
]


@pytest.mark.parametrize("keys, key, expected", RED_TEAM)
def test_red_team_values_are_file_line_errors(tmp_path: Path, keys: dict[str, str], key: str, expected: str) -> None:
    write_catalog(tmp_path, batch(**keys), base=BASE)
    settings = settings_from_mapping({"data_dir": str(tmp_path / "var")}, tmp_path / "broker.yaml")
    with pytest.raises(ConfigError) as error:
        load_catalog(tmp_path / "ota.yaml", settings)
    (issue,) = error.value.issues
    text = (tmp_path / "ota.yaml").read_text().splitlines()
    assert text[issue.line - 1].strip().startswith(f"{key.split('.')[0].split('[')[0]}:"), (issue.line, str(issue))
    assert str(issue).startswith(f"{tmp_path / 'ota.yaml'}:{issue.line}: batches[0].{key}: "), str(issue)
    assert expected in issue.message and "\n" not in str(issue) and len(str(issue)) < 300, str(issue)


def test_values_at_the_ends_of_the_ranges_load_and_run(tmp_path: Path) -> None:
    w = World(tmp_path, batch(start_at='"2000-01-01T00:00:00Z"', end_at='"8999-12-31T23:59:59Z"',
                              rate_per_minute="1000000", retry="{count: 100, interval_minutes: 525600}",
                              abort="{failure_percent: 100, min_finished: 10000000}", timeout_minutes="525600",
                              windows="[" + ", ".join(['{cron: "0 0 1 1 *", minutes: 10080, timezone: "-14:00"}'] * 24)
                                      + "]"))
    w.online.add("d1")
    w.report("d1", "1.0.0")
    assert admin.rollout_view(w.live, "up")["state"] == "outside_window"
    w.now = dt.datetime(8999, 1, 1, 15, tzinfo=dt.timezone.utc).timestamp()  # 01:00 on Jan 1st at -14:00
    assert pushed(tick(w)) == {"d1"}
    w.now = dt.datetime(9000, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    tick(w)
    assert admin.rollout_view(w.live, "up")["state"] == "ended"


def test_retry_on_is_read_although_yaml_calls_it_true(tmp_path: Path) -> None:
    write_catalog(tmp_path, batch(retry="{count: 2, interval_minutes: 0.5, on: [timeout, boot]}"), base=BASE)
    settings = settings_from_mapping({"data_dir": str(tmp_path / "var")}, tmp_path / "broker.yaml")
    policy = load_catalog(tmp_path / "ota.yaml", settings).batches["up"].policy
    assert policy.retry is not None and policy.retry.on == {"timeout", "boot"} and policy.retry.interval_minutes == 0.5


def test_no_policy_means_no_change_and_no_tick_work(tmp_path: Path) -> None:
    w = World(tmp_path, batch())
    w.online.add("d1")
    assert pushed(w.report("d1", "1.0.0").sends) == {"d1"}
    assert w.state.batches["up"].control == {}
    assert tick(w, 1) == [] and admin.rollout_view(w.live, "up")["state"] == "active"
    assert S  # (states imported for the tests above)
