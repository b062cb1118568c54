"""The subscription table, indexed by client and capped per device (bugs 8 and 14).

amqtt walks every filter on the broker for each connect and each deleted session (O(fleet)
per device), logs `repr()` of the whole table on every SUBSCRIBE, leaves an empty entry for
an unsubscribed filter for good, iterates the table across awaits (a client subscribing or
leaving meanwhile lost the message for the subscribers not reached yet), and lets one client
hold any number of filters. Per broker, `_subscriptions` becomes a _SubscriptionTable (the
same dict, with a cheap repr and an index of each client's filters) and `add_subscription`,
`_del_subscription` and `_del_all_subscriptions` keep the index and cap a device's filters
at `limits.max_subscriptions`.
"""
from __future__ import annotations

import contextvars
import logging
from typing import Any

from amqtt.broker import Broker
from amqtt.session import Session

from otacore.protocol.credentials import DeviceId

from .identity import session_device
from .limits import limits_of

log = logging.getLogger("ota.broker")

_SUBSCRIPTION_REFUSED = 0x80  # SUBACK return code


# The client id whose CONNECT the current task is handling (set by the hardened initializer).
_CONNECTING: contextvars.ContextVar[str | None] = contextvars.ContextVar("ota_connecting_client", default=None)


class _SubscriptionTable(dict):
    """amqtt's filter -> [(session, qos)] table, plus the filters each client id holds.

    amqtt walks every filter on the broker for each connect (offering retained messages)
    and for each session it deletes: O(fleet) per device, so at 10,000 devices (30,000
    filters) connects and reconnects cost milliseconds each. With the index, deleting a
    session visits only its own filters, and inside a connecting client's task iterating
    the table yields only that client's filters (the only ones whose retained messages it
    may get; see _retained_for_own_filters). `keys()`/`items()` still see every filter.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.held: dict[str, set[str]] = {}
        self.per_device: dict[DeviceId, int] = {}  # filters held, over the device's client ids
        self._device_of: dict[str, DeviceId | None] = {}

    def hold(self, client_id: str, topic_filter: str, device: DeviceId | None) -> None:
        filters = self.held.setdefault(client_id, set())
        if topic_filter not in filters:
            filters.add(topic_filter)
            self._device_of[client_id] = device
            if device is not None:
                self.per_device[device] = self.per_device.get(device, 0) + 1

    def release(self, client_id: str, topic_filter: str | None = None) -> list[str]:
        """Forget one filter of the client (or all of them); returns the filters forgotten."""
        filters = self.held.get(client_id)
        if filters is None:
            return []
        if topic_filter is None:
            gone = list(filters)
            del self.held[client_id]
        elif topic_filter in filters:
            filters.discard(topic_filter)
            gone = [topic_filter]
        else:
            return []
        device = self._device_of.get(client_id)
        if device is not None:
            left = self.per_device.get(device, 0) - len(gone)
            if left > 0:
                self.per_device[device] = left
            else:
                self.per_device.pop(device, None)
        if client_id not in self.held or not filters:
            self.held.pop(client_id, None)
            self._device_of.pop(client_id, None)
        return gone

    def __iter__(self) -> Any:
        client_id = _CONNECTING.get()
        if client_id is None:
            return super().__iter__()
        return iter([topic_filter for topic_filter in self.held.get(client_id, ()) if topic_filter in self])

    def items(self) -> Any:
        """A copy: amqtt's broadcast awaits (the ACL) while it iterates, and a client that
        subscribes or leaves meanwhile made it raise "dictionary changed size during
        iteration", dropping the message for the subscribers not reached yet (bug 14)."""
        return list(super().items())

    def clear(self) -> None:
        super().clear()
        self.held.clear()
        self.per_device.clear()
        self._device_of.clear()

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"


def _indexed_add_subscription(broker: Broker, table: _SubscriptionTable) -> Any:
    """Also caps the filters of one device (over all its client ids) at max_subscriptions:
    100,000 filters from one device made every later connect of every device slow."""
    add = broker.add_subscription

    async def add_subscription(subscription: tuple[str, int], session: Session) -> int:
        held = table.held.get(session.client_id or "", ())
        device = session_device(session)
        if subscription[0] not in held and device is not None:
            limit = limits_of(broker).max_subscriptions
            if table.per_device.get(device, 0) >= limit:
                log.info("SUBSCRIBE refused: %s: %r is over limits.max_subscriptions (%d)", device, subscription[0],
                         limit)
                return _SUBSCRIPTION_REFUSED
        qos = await add(subscription, session)
        if qos != _SUBSCRIPTION_REFUSED and session.client_id is not None:
            table.hold(session.client_id, subscription[0], device)
        return qos

    return add_subscription


def _indexed_del_subscription(broker: Broker, table: _SubscriptionTable) -> Any:
    """amqtt's UNSUBSCRIBE leaves an empty list under the filter for good; drop it, and the
    filter from the client's index."""
    delete = broker._del_subscription

    def del_subscription(topic_filter: str, session: Session) -> int:
        deleted = delete(topic_filter, session)
        if table.get(topic_filter, True) == []:
            del table[topic_filter]
        table.release(session.client_id or "", topic_filter)
        return deleted

    return del_subscription


def _indexed_del_all_subscriptions(broker: Broker, table: _SubscriptionTable) -> Any:
    async def del_all_subscriptions(session: Session) -> None:
        for topic_filter in table.release(session.client_id or ""):
            broker._del_subscription(topic_filter, session)

    return del_all_subscriptions


def patch_broker(broker: Broker) -> None:
    """This broker's subscription table becomes a _SubscriptionTable, kept by its methods."""
    # amqtt logs `repr(self._subscriptions)` on every SUBSCRIBE, at any log level: with a
    # fleet that is every session's repr, per subscribe. Same dict, cheap repr, and an
    # index of the filters each client holds (see _SubscriptionTable).
    table = _SubscriptionTable(broker._subscriptions)
    broker._subscriptions = table
    broker.add_subscription = _indexed_add_subscription(broker, table)  # type: ignore[method-assign]
    broker._del_all_subscriptions = _indexed_del_all_subscriptions(broker, table)  # type: ignore[method-assign]
    broker._del_subscription = _indexed_del_subscription(broker, table)  # type: ignore[method-assign]
