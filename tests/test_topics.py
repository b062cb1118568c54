"""otacore/protocol/topics.py: upstream OTA topics, each device's namespace, and filters matching a topic."""
from __future__ import annotations

from itertools import product as cartesian

import pytest

from otacore.protocol.credentials import DeviceId
from otacore.protocol.topics import (FILE_DOWNLOAD, FIRMWARE_GET, INFORM, PROGRESS, download_reply_topic,
                            filters_matching, firmware_get_reply_topic, in_namespace, parse_upstream,
                            upgrade_topic)

DEV = DeviceId("a1PK", "dev1")


# --- upstream topics ----------------------------------------------------------------------

@pytest.mark.parametrize("topic, kind", [
    ("/ota/device/inform/a1PK/dev1", INFORM),
    ("/ota/device/progress/a1PK/dev1", PROGRESS),
    ("/sys/a1PK/dev1/thing/ota/firmware/get", FIRMWARE_GET),
    ("/sys/a1PK/dev1/thing/file/download", FILE_DOWNLOAD),
])
def test_parse_upstream_recognises_the_four_topics(topic, kind):
    parsed = parse_upstream(topic)
    assert parsed is not None and (parsed.kind, parsed.device) == (kind, DEV)


@pytest.mark.parametrize("topic", [
    "/ota/device/upgrade/a1PK/dev1",                     # downstream
    "/sys/a1PK/dev1/thing/ota/firmware/get_reply",       # downstream
    "/sys/a1PK/dev1/thing/file/download_reply",          # downstream
    "ota/device/inform/a1PK/dev1",                       # no leading slash
    "/ota/device/inform/a1PK",                           # too short
    "/ota/device/inform/a1PK/dev1/extra",                # too long
    "/ota/device/report/a1PK/dev1",
    "/sys/a1PK/dev1/thing/ota/firmware/get/more",
    "/sys/a1PK/dev1/thing/ota/firmware",
    "/sys/a1PK/dev1/thing/file/upload",
    "/sys/a1PK/dev1/other/ota/firmware/get",
    "/a1PK/dev1/user/update",
    "",
])
def test_parse_upstream_ignores_other_topics(topic):
    assert parse_upstream(topic) is None


def test_downstream_topic_names():
    assert upgrade_topic(DEV) == "/ota/device/upgrade/a1PK/dev1"
    assert firmware_get_reply_topic(DEV) == "/sys/a1PK/dev1/thing/ota/firmware/get_reply"
    assert download_reply_topic(DEV) == "/sys/a1PK/dev1/thing/file/download_reply"


# --- namespace ----------------------------------------------------------------------------

@pytest.mark.parametrize("topic", [
    "/ota/device/inform/a1PK/dev1",
    "/ota/device/upgrade/a1PK/dev1",
    "/ota/device/progress/a1PK/dev1",
    "/ota/device/+/a1PK/dev1",
    "/sys/a1PK/dev1/thing/ota/firmware/get",
    "/sys/a1PK/dev1/thing/ota/firmware/get_reply",
    "/sys/a1PK/dev1/#",
    "/sys/a1PK/dev1/+/file/+",
    "/sys/a1PK/dev1/thing/#",
    "/sys/a1PK/dev1",
    "/a1PK/dev1/user/update",
    "/a1PK/dev1/#",
    "/a1PK/dev1/+/+",
])
def test_in_namespace_allows_own_topics_and_filters(topic):
    assert in_namespace(DEV, topic)


@pytest.mark.parametrize("topic", [
    "#",
    "+",
    "/#",
    "/+/dev1/#",
    "/a1PK/+/#",
    "/a1PK/+/user/update",
    "/sys/+/dev1/#",
    "/sys/a1PK/+/#",
    "/sys/#",
    "/ota/device/+/a1PK/+",
    "/ota/device/+/+/dev1",
    "/ota/device/#",
    "/ota/device/inform/a1PK/#",
    "/ota/device/inform/a1PK/dev2",
    "/ota/device/inform/a1PK/dev1/#",
    "/ota/device/other/a1PK/dev1",
    "/sys/a1PK/dev2/thing/ota/firmware/get",
    "/a1PK/dev2/user/update",
    "/a1PX/dev1/user/update",
    "/sys/a1PK/dev1/#/x",         # `#` not last
    "/sys/a1PK/dev1/a+/b",        # wildcard inside a level
    "/sys/a1PK/dev1/a#",
    "a1PK/dev1/user/update",      # no leading slash
])
def test_in_namespace_denies_other_topics_and_escaping_wildcards(topic):
    assert not in_namespace(DEV, topic)


def test_namespace_of_product_named_sys_does_not_reach_other_devices():
    # device `x` of product `sys` owns `/sys/x/#`, which covers /sys/x/thing/... of device `thing`
    # of product `x`: its firmware/get replies, block downloads, everything.
    assert not in_namespace(DeviceId("sys", "x"), "/sys/x/#")


# --- filters_matching against a brute-force MQTT matcher ----------------------------------

def mqtt_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7 matching, level by level (no `$` topics here)."""
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return index == len(filter_levels) - 1
        if index >= len(topic_levels) or (level != "+" and level != topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


@pytest.mark.parametrize("topic_filter, topic, expected", [
    ("sport/tennis/#", "sport/tennis", True),
    ("sport/tennis/#", "sport/tennis/player1/ranking", True),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("#", "/finance", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/#/x", "sport/a/x", False),
])
def test_brute_force_matcher_follows_the_mqtt_spec(topic_filter, topic, expected):
    assert mqtt_matches(topic_filter, topic) is expected


def candidate_filters(topic: str) -> set[str]:
    """Every filter over the topic's own levels, `+`, another name, and a trailing `#`."""
    levels = topic.split("/")
    found = {"#", "+"}
    for length in range(1, len(levels) + 1):
        for choice in cartesian(*[(level, "+", "other") for level in levels[:length]]):
            found.add("/".join(choice))
            found.add("/".join(choice + ("#",)))
    return found


@pytest.mark.parametrize("topic", [
    "/ota/device/upgrade/a1PK/dev1",
    "/ota/device/inform/a1PK/dev1",
    "/sys/a1PK/dev1/thing/ota/firmware/get_reply",
    "/sys/a1PK/dev1/thing/file/download_reply",
    "/sys/a1PK/dev1",
    "/sys/a1PK/dev1/a//b",
    "/a1PK/dev1/user/update",
    "/a1PK/dev1",
    "/ota/device/upgrade/a1PK/dev2",   # other devices' topics: no namespace filter may match
    "/sys/a1PK/dev2/thing/ota/firmware/get_reply",
    "/a1PX/dev1/user/update",
])
def test_filters_matching_equals_brute_force(topic):
    expected = {f for f in candidate_filters(topic) if in_namespace(DEV, f) and mqtt_matches(f, topic)}
    assert expected or not in_namespace(DEV, topic)
    returned = filters_matching(DEV, topic)
    assert all(mqtt_matches(f, topic) for f in returned), "a returned filter does not match the topic"
    assert {f for f in returned if in_namespace(DEV, f)} == expected
    assert len(returned) == len(set(returned))


def test_filters_matching_for_an_upgrade_push():
    assert sorted(filters_matching(DEV, "/ota/device/upgrade/a1PK/dev1")) == [
        "/ota/device/+/a1PK/dev1", "/ota/device/upgrade/a1PK/dev1"]


def test_filters_matching_is_complete_for_a_product_named_sys():
    device, topic = DeviceId("sys", "sys"), "/sys/sys/sys/x"
    expected = {f for f in candidate_filters(topic) if in_namespace(device, f) and mqtt_matches(f, topic)}
    assert expected <= set(filters_matching(device, topic))


# -- what a device may do (otacore/protocol/access.py) -----------------------------------------

def test_device_access_is_its_namespace_and_never_a_downstream_ota_topic() -> None:
    from otacore.protocol.access import Access, device_may

    me = DeviceId("a1Test", "d1")
    inform, upgrade = "/ota/device/inform/a1Test/d1", "/ota/device/upgrade/a1Test/d1"
    get, get_reply = "/sys/a1Test/d1/thing/ota/firmware/get", "/sys/a1Test/d1/thing/ota/firmware/get_reply"
    for taken_in_broker in (True, False):
        def may(topic: str, access: Access) -> bool:
            return device_may(me, topic, access, upstream_taken_in_broker=taken_in_broker)

        assert not may(upgrade, Access.PUBLISH) and not may(get_reply, Access.PUBLISH)  # forged pushes/replies
        assert may(upgrade, Access.SUBSCRIBE) and may(get_reply, Access.RECEIVE)
        assert may("/sys/a1Test/d1/thing/event/property/post", Access.PUBLISH)
        assert not may("/ota/device/inform/a1Test/d2", Access.PUBLISH)  # another device's topic
        assert not may("/sys/a1Test/+/thing/#", Access.SUBSCRIBE) and not may("", Access.RECEIVE)
        # Upstream OTA topics: consumed from the packet path in the embedded broker (routing
        # denied), published like any topic where the server subscribes (a broker cluster).
        assert may(inform, Access.PUBLISH) is (not taken_in_broker)
        assert may(get, Access.PUBLISH) is (not taken_in_broker)
