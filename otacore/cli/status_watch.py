"""`otactl status --watch` on a terminal: one progress bar per batch, split by the state of
each device's latest job, redrawn in place with rich until Ctrl-C.

Everything shown comes from the status report (status.py) and may carry what devices sent:
it goes into rich as plain Text (never markup) and through clean_field first.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from otacore.log_hygiene import clean_field

BAR_WIDTH = 40
# Bar segments, left to right: finished first, then under way, then not started.
SEGMENTS = (("succeeded", "green"), ("failed", "red"), ("canceled", "grey50"), ("installed", "cyan"),
            ("in_progress", "yellow"), ("notified", "blue"), ("queued", "magenta"), ("waiting_report", "grey35"))


def _clean(value: Any, limit: int = 120) -> str:
    return clean_field(str(value), limit)


def state_bar(counts: dict[str, int], waiting: int, width: int = BAR_WIDTH) -> Text:
    """A bar of `width` cells, each state's share in its colour (at least one cell each)."""
    parts = [(state, counts.get(state, 0) if state != "waiting_report" else waiting, style)
             for state, style in SEGMENTS]
    parts = [(state, n, style) for state, n, style in parts if n > 0]
    total = sum(n for _, n, _ in parts)
    bar = Text()
    if total == 0:
        return Text("·" * width, style="grey35")
    cells = [max(1, round(width * n / total)) for _, n, _ in parts]
    while sum(cells) > width:  # rounding up small shares can overshoot: take from the largest
        cells[cells.index(max(cells))] -= 1
    cells[cells.index(max(cells))] += width - sum(cells)
    for (_, _, style), size in zip(parts, cells):
        bar.append("█" * size, style=style)
    return bar


def _counts_text(summary: dict[str, Any]) -> Text:
    text = Text()
    counts = dict(summary["counts"])
    if summary.get("waiting_report"):
        counts["waiting_report"] = summary["waiting_report"]
    styles = dict(SEGMENTS)
    for i, (state, n) in enumerate(counts.items()):
        if i:
            text.append(", ")
        text.append(f"{state} {n}", style=styles.get(state, ""))
    return text if counts else Text("no devices yet", style="grey50")


def batches_view(report: dict[str, Any], every: float) -> RenderableType:
    """Every batch: name, state, its bar, percent done and the counts per state."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in ("BATCH", "STATE", "PROGRESS", "DONE", "DEVICES"):
        table.add_column(column, no_wrap=column != "DEVICES")
    for summary in report["batches"]:
        state = _clean(summary["state"])
        if summary.get("rollout", {}).get("state") in ("paused", "halted"):
            state += f" ({summary['rollout']['state']})"
        table.add_row(Text(_clean(summary["name"])), Text(state), state_bar(summary["counts"],
                      summary["waiting_report"]), Text(f"{summary['done_percent']}%"), _counts_text(summary))
    if not report["batches"]:
        table.add_row(Text("no batches"), Text(""), Text(""), Text(""), Text(""))
    return Group(_heading(every), table)


def batch_view(report: dict[str, Any], every: float, rows: int) -> RenderableType:
    """One batch: its bar and its devices (as many as fit in `rows`)."""
    summary = report["batch"]
    head = Text(_clean(f"{summary['name']}: {summary['type']} {summary['package']} via {summary['protocol']}, "
                       f"state {summary['state']}, {summary['done_percent']}% done of {summary['total']}", 300))
    bar = Text.assemble(state_bar(summary["counts"], summary["waiting_report"]), "  ", _counts_text(summary))
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in ("DEVICE", "STATE", "PROGRESS", "SERVED", "LAST MESSAGE"):
        table.add_column(column, no_wrap=True)
    devices = report["devices"]
    for device in devices[:max(rows, 1)]:
        message = device.get("message") or ""
        if device.get("code") is not None:
            message = f"[{device['code']}] {message}"
        table.add_row(Text(_clean(device["device"])), Text(_clean(device["state"])), Text(f"{device['progress']}%"),
                      Text(f"{device['served_percent']}%"), Text(_clean(message)))
    more = Text(f"... and {len(devices) - rows} more (otactl status {summary['name']})", style="grey50") \
        if len(devices) > rows else Text("")
    return Group(_heading(every), head, bar, Text(""), table, more)


def _heading(every: float) -> Text:
    return Text(f"{time.strftime('%H:%M:%S')}  every {every:g} s, Ctrl-C to stop", style="grey50")


def watch_live(fetch: Callable[[], dict[str, Any]], every: float, one_batch: bool,
               console: Console | None = None) -> int:
    """Redraw in place every `every` seconds until Ctrl-C (then 0). An error while fetching
    (a SystemExit with its one line) ends the watch with it."""
    console = console or Console()

    def view() -> RenderableType:
        report = fetch()
        if one_batch:
            return batch_view(report, every, max(console.size.height - 8, 1))
        return batches_view(report, every)

    try:
        with Live(view(), console=console, auto_refresh=False, transient=False) as live:
            while True:
                time.sleep(max(every, 0.2))
                live.update(view(), refresh=True)
    except KeyboardInterrupt:
        return 0
