"""Near the open-files limit the listeners stop accepting; connections wait, then get in."""
from __future__ import annotations

import asyncio
import logging

import pytest

from otaserver.connection_budget import ConnectionBudget


async def test_listeners_pause_near_the_limit_and_resume(caplog: pytest.LogCaptureFixture) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    budget = ConnectionBudget(lambda: sum(not w.is_closing() for w in accepted), lambda: server.sockets)
    budget.high, budget.low = 3, 1
    clients = []
    try:
        for _ in range(3):
            clients.append(await asyncio.open_connection("127.0.0.1", port))
        while len(accepted) < 3:
            await asyncio.sleep(0.01)
        with caplog.at_level(logging.INFO, logger="ota.server"):
            budget.check()
            assert budget.paused and "near the open-files limit" in caplog.text
            clients.append(await asyncio.open_connection("127.0.0.1", port))  # waits in the backlog
            await asyncio.sleep(0.2)
            assert len(accepted) == 3
            for writer in accepted[:2]:
                writer.close()
            budget.check()
            assert not budget.paused and "accepting new connections again" in caplog.text
        for _ in range(100):
            if len(accepted) == 4:
                break
            await asyncio.sleep(0.01)
        assert len(accepted) == 4
    finally:
        for _, writer in clients:
            writer.close()
        server.close()
        await budget.stop()


def test_accept_errors_are_reported_once_per_interval() -> None:
    from otaserver.connection_budget import accept_error_filter
    accept_filter = accept_error_filter()

    def record(at: float, msg: str = "socket.accept() out of system resource") -> logging.LogRecord:
        made = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)
        made.created = at
        return made

    shown = [r for r in (record(100 + i * 0.01) for i in range(500)) if accept_filter.filter(r)]
    assert len(shown) == 1 and shown[0].exc_info is None
    later = record(111)
    assert accept_filter.filter(later) and "499 more" in later.msg
    assert accept_filter.filter(record(111.5, "something else"))
