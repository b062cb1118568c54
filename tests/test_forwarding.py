"""cluster_worker/forwarding.py on its own (no RabbitMQ, no PostgreSQL): what a request passed
to another worker is answered when its client misbehaves."""
from __future__ import annotations

import asyncio
import base64
from types import SimpleNamespace

from aiohttp import web

from cluster_worker.forwarding import Forwarding
from fileserver.app import ENGINE


async def test_a_body_trickled_to_a_worker_that_passes_it_on_is_answered_408() -> None:
    """As the worker holding the device answers it (fileserver/app.py), not aiohttp's 504."""
    share = SimpleNamespace(holder_url=lambda device: "http://127.0.0.1:9")  # never reached
    engine = SimpleNamespace(settings=SimpleNamespace(header_timeout_seconds=1))
    forwarding = Forwarding(share, engine)  # type: ignore[arg-type]
    app = web.Application(middlewares=[forwarding.middleware])
    app[ENGINE] = engine  # type: ignore[misc]  (what the body deadline reads)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        user = base64.b64encode(b"cam-1&a1Demo:secret")
        writer.write(b"POST /base-api/api/v1/write_ota_info HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + user
                     + b"\r\nContent-Length: 100\r\n\r\n{")
        status = (await asyncio.wait_for(reader.readline(), 5)).decode()
        writer.close()
        await writer.wait_closed()
        assert " 408 " in status, status
        assert forwarding.forwarded == 0
    finally:
        await forwarding.close()
        await runner.cleanup()
