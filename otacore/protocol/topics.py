"""OTA topic names, which ones the server consumes, and each device's topic namespace (docs/protocol.md 2-3)."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product as cartesian

from otacore.protocol.credentials import DeviceId

# Upstream kinds: what the server consumes and never routes to other clients.
INFORM, PROGRESS, FIRMWARE_GET, FILE_DOWNLOAD = "inform", "progress", "firmware_get", "file_download"


@dataclass(frozen=True)
class OtaTopic:
    kind: str
    device: DeviceId


def parse_upstream(topic: str) -> OtaTopic | None:
    """Recognise the four device -> server OTA topics; None for anything else."""
    parts = topic.split("/")
    if len(parts) == 6 and parts[0] == "" and parts[1:3] == ["ota", "device"] and parts[3] in (INFORM, PROGRESS):
        return OtaTopic(parts[3], DeviceId(parts[4], parts[5]))
    if len(parts) == 8 and parts[0] == "" and parts[1] == "sys" and parts[4] == "thing":
        tail = parts[5:]
        if tail == ["ota", "firmware", "get"]:
            return OtaTopic(FIRMWARE_GET, DeviceId(parts[2], parts[3]))
    if len(parts) == 7 and parts[0] == "" and parts[1] == "sys" and parts[4:] == ["thing", "file", "download"]:
        return OtaTopic(FILE_DOWNLOAD, DeviceId(parts[2], parts[3]))
    return None


def parse_downstream(topic: str) -> DeviceId | None:
    """The device a server -> device OTA topic (upgrade push, firmware/get and block replies)
    is addressed to; None for anything else. Only the server publishes these."""
    parts = topic.split("/")
    if len(parts) == 6 and parts[0] == "" and parts[1:4] == ["ota", "device", "upgrade"]:
        return DeviceId(parts[4], parts[5])
    if len(parts) == 8 and parts[0] == "" and parts[1] == "sys" and parts[4:] == ["thing", "ota", "firmware", "get_reply"]:
        return DeviceId(parts[2], parts[3])
    if len(parts) == 7 and parts[0] == "" and parts[1] == "sys" and parts[4:] == ["thing", "file", "download_reply"]:
        return DeviceId(parts[2], parts[3])
    return None


def is_ota_topic(topic: str) -> bool:
    return parse_upstream(topic) is not None or parse_downstream(topic) is not None


UPGRADE_TOPIC_PREFIX = "/ota/device/upgrade/"  # of every upgrade_topic()


def upgrade_topic(device: DeviceId) -> str:
    return f"/ota/device/upgrade/{device.product_key}/{device.device_name}"


def firmware_get_reply_topic(device: DeviceId) -> str:
    return f"/sys/{device.product_key}/{device.device_name}/thing/ota/firmware/get_reply"


def download_reply_topic(device: DeviceId) -> str:
    return f"/sys/{device.product_key}/{device.device_name}/thing/file/download_reply"


def _fixed_prefix_len(levels: list[str], device: DeviceId) -> int:
    """How many leading levels of `levels` name the device's own namespace; 0 if none does."""
    pk, dn = device.product_key, device.device_name
    if len(levels) >= 4 and levels[0] == "" and levels[1] == "sys" and levels[2:4] == [pk, dn]:
        return 4
    if len(levels) >= 3 and levels[0] == "" and levels[1:3] == [pk, dn] and pk not in ("sys", "ota"):
        return 3
    return 0


def in_namespace(device: DeviceId, topic_or_filter: str) -> bool:
    """May this device publish to / subscribe to `topic_or_filter`?

    Allowed: `/ota/device/{inform|upgrade|progress|+}/{pk}/{dn}`, and anything at or below
    `/sys/{pk}/{dn}/` or `/{pk}/{dn}/`, where wildcards may appear only below the device's
    own levels, so a filter never reaches another device's topics.
    """
    levels = topic_or_filter.split("/")
    pk, dn = device.product_key, device.device_name
    if len(levels) == 6 and levels[0] == "" and levels[1:3] == ["ota", "device"]:
        return levels[3] in ("inform", "upgrade", "progress", "+") and levels[4:] == [pk, dn]
    fixed = _fixed_prefix_len(levels, device)
    if fixed == 0:
        return False
    rest = levels[fixed:]
    if "#" in rest[:-1] or any(("+" in level or "#" in level) and len(level) > 1 for level in rest):
        return False
    return True


def filters_matching(device: DeviceId, topic: str) -> list[str]:
    """Every subscription filter inside the device's namespace that matches `topic`.

    The direct reply path looks these up instead of scanning every filter on the broker;
    `in_namespace` guarantees a device cannot hold a matching filter outside this list.
    """
    levels = topic.split("/")
    if len(levels) == 6 and levels[1:3] == ["ota", "device"]:
        return [topic, "/".join(levels[:3] + ["+"] + levels[4:])]
    fixed = _fixed_prefix_len(levels, device)
    if fixed == 0:
        return [topic]
    head, rest = levels[:fixed], levels[fixed:]
    found = []
    for choice in cartesian(*[(level, "+") for level in rest]):
        found.append("/".join(head + list(choice)))
    for cut in range(len(rest) + 1):  # `#` also matches its parent level
        for choice in cartesian(*[(level, "+") for level in rest[:cut]]):
            found.append("/".join(head + list(choice) + ["#"]))
    return found
