"""Firmware version strings: the catalog's `N.N.N` format and how versions compare."""
from __future__ import annotations

import re

VERSION_PATTERN = re.compile(r"^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\Z")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """Return the three numbers of an `N.N.N` version, or None when `text` is not one."""
    match = VERSION_PATTERN.match(text)
    if match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def is_version(text: str) -> bool:
    return parse_version(text) is not None


def is_lower(reported: str, target: str) -> bool:
    """True when `reported` is an N.N.N version strictly below `target`.

    Devices may report anything; a version we cannot order is never "lower", so such a
    device is only targeted by a batch that names its version in `src_versions`.
    """
    left, right = parse_version(reported), parse_version(target)
    return left is not None and right is not None and left < right
