"""Stored sessions: capped per device, and expired.

amqtt stores a session for every client id that connects with clean_session=0, for good:
a device that connects with a new client id each time (Aliyun's ids carry a timestamp)
stored a session per connect. A device's stored sessions are capped at
MAX_SESSIONS_PER_DEVICE client ids, its oldest offline ones deleted first; and amqtt's own
session monitor (once a second) is told to drop a disconnected session after
`limits.session_expiry_seconds` (broker.yaml `session_expiry_hours`), which it otherwise never does.
"""
from __future__ import annotations

from amqtt.broker import Broker
from amqtt.session import Session

from otacore.protocol.credentials import DeviceId

from .identity import session_device
from .internals import _per_broker

_STORED = "_ota_stored_sessions"
MAX_SESSIONS_PER_DEVICE = 8  # client ids a device's stored sessions may use; the oldest offline go first


class _StoredSessions:
    """The client ids of each device's stored sessions, newest last."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        # Plain dicts keep insertion order at a third of an OrderedDict's size (one per device).
        self._client_ids: dict[DeviceId, dict[str, None]] = {}

    async def stored(self, session: Session) -> None:
        """Note the session a device now uses; drop its oldest offline sessions past the cap."""
        device = session_device(session)
        if device is None or session.client_id is None:
            return
        ids = self._client_ids.setdefault(device, {})
        ids.pop(session.client_id, None)
        ids[session.client_id] = None
        if len(ids) <= MAX_SESSIONS_PER_DEVICE:
            return
        for client_id in list(ids):
            entry = self._broker._sessions.get(client_id)
            if entry is None:
                del ids[client_id]  # expired or cleaned already
            elif client_id != session.client_id and not entry[0].transitions.is_connected():
                del ids[client_id]
                await self._broker._delete_session(client_id)
            if len(ids) <= MAX_SESSIONS_PER_DEVICE:
                return


def _stored_sessions(broker: Broker) -> _StoredSessions:
    return _per_broker(broker, _STORED, _StoredSessions)


def _expire_stored_sessions(broker: Broker, seconds: float) -> None:
    # amqtt's own session monitor (once a second) drops disconnected sessions this old.
    broker.config.session_expiry_interval = int(seconds)
