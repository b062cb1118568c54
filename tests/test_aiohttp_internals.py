"""fileserver/aiohttp_internals.py: the aiohttp private details the file server reads, on a
real aiohttp server. End to end: tests/test_downloads.py (PackageResponse) and
tests/test_hostile_http.py (the header deadline and the cap, through HttpSite)."""
from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from fileserver.aiohttp_internals import (ListenerSite, check_aiohttp, http_listening_sockets, requests_parsed,
                                          waiting_for_request)


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def test_a_listener_site_reports_its_connections_and_what_they_wait_for() -> None:
    check_aiohttp()
    app = web.Application()
    app.router.add_get("/", _ok)
    runner = web.AppRunner(app)
    await runner.setup()
    accepted: list[object] = []

    def factory(server: web.Server):  # type: ignore[no-untyped-def]
        def accept():  # type: ignore[no-untyped-def]
            accepted.append(handler := server())
            return handler
        return accept

    await ListenerSite(runner, "127.0.0.1", 0, protocol_factory=factory, handshake_timeout=1.0).start()
    try:
        [sock] = http_listening_sockets(runner)
        port = sock.getsockname()[1]
        async with aiohttp.ClientSession() as client:  # keeps the connection alive after the answer
            async with client.get(f"http://127.0.0.1:{port}/") as response:
                assert await response.text() == "ok"
            [handler] = accepted
            for _ in range(100):
                if waiting_for_request(handler):  # type: ignore[arg-type]
                    break
                await asyncio.sleep(0.01)
            assert waiting_for_request(handler) and requests_parsed(handler) == 1  # type: ignore[arg-type]
    finally:
        await runner.cleanup()
