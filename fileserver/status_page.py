"""A small, self-refreshing HTML status page for admins (the same data as `otactl status`)."""
from __future__ import annotations

import time
from html import escape
from typing import Any

STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}th{background:#f4f4f4}
.bar{background:#eee;width:120px;height:10px;display:inline-block}.bar i{background:#3a7;height:10px;display:block}
.failed{color:#b00}.succeeded{color:#070}"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f"{body}<p><small>refreshes every 5 s</small></p></body></html>")


def _bar(percent: int) -> str:
    return f'<span class=bar><i style="width:{max(0, min(100, percent))}%"></i></span> {percent}%'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def batches_page(summaries: list[dict[str, Any]]) -> str:
    rows = []
    for s in summaries:
        counts = ", ".join(f"<span class={escape(k)}>{escape(k)} {v}</span>" for k, v in s["counts"].items())
        rows.append([f'<a href="batches/{escape(s["name"])}">{escape(s["name"])}</a>', escape(s["package"]),
                     escape(s["type"]), escape(s["protocol"]), escape(s["state"]), escape(s["package_status"]),
                     _bar(s["done_percent"]), counts or "no devices yet"])
    table = _table(["batch", "package", "type", "protocol", "state", "package status", "done", "devices"], rows)
    return _page("OTA batches", table)


def batch_page(summary: dict[str, Any], devices: list[dict[str, Any]]) -> str:
    rows = []
    for d in devices:
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["updated_at"])) if d.get("updated_at") else "-"
        code = f"[{d['code']}] " if d.get("code") is not None else ""
        rows.append([escape(d["device"]), f"<span class={escape(d['state'])}>{escape(d['state'])}</span>",
                     escape(str(d.get("from", "-"))), escape(str(d.get("to", "-"))), _bar(d["progress"]),
                     _bar(d["served_percent"]), escape(updated), escape(code + (d.get("message") or ""))])
    intro = (f"<p>{escape(summary['type'])} of {escape(summary['package'])} via {escape(summary['protocol'])}, "
             f"{escape(summary['mode'])}; state {escape(summary['state'])}; {summary['done_percent']}% done, "
             f"{summary['succeeded_percent']}% succeeded of {summary['total']}. <a href=../>all batches</a></p>")
    table = _table(["device", "state", "from", "to", "reported", "served", "updated", "last message"], rows)
    return _page(f"Batch {summary['name']}", intro + table)
