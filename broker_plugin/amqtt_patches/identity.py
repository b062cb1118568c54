"""Who a session is: its device, and its client id as the device sent it (bug 6).

amqtt keys sessions by client id alone: a device with valid credentials of its own could
close another device's connection by using its client id, or squat it for as long as a
stored session lasts. Inside the broker a client id is scoped to the device that logged in
(`{productKey}/{deviceName}/{clientId}`, `_scope_client_id`); devices never see the
difference (`wire_client_id` is what they sent, which signed passwords cover), and two
devices may use the same client id.
"""
from __future__ import annotations

from amqtt.session import Session

from otacore.protocol.credentials import DeviceId, parse_username


def wire_client_id(session: Session) -> str | None:
    """The client id as the device sent it (inside the broker it is scoped to the device)."""
    return getattr(session, "ota_wire_client_id", session.client_id)


def session_device(session: Session | None) -> DeviceId | None:
    """The device a connected session authenticated as (its username is `{dn}&{pk}`)."""
    return parse_username(session.username) if session is not None else None


def _scope_client_id(session: Session, device: DeviceId | None) -> None:
    """Scope the client id of an authenticated CONNECT to its device; keep the one sent."""
    session.ota_wire_client_id = session.client_id  # as sent: signed passwords cover it
    if device is not None:
        session.client_id = f"{device.product_key}/{device.device_name}/{session.client_id}"
