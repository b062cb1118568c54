"""The web console in a real browser: headless Chromium (Debian's `chromium`, installed by
scripts/test when missing), driven over the DevTools protocol with aiohttp's websocket
client, against the real server while simulated devices upgrade. The page must show a
progress bar, see a device's state change without a reload, and retry a failed device, all
under the server's Content-Security-Policy without one violation."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.harness import Device, OtaServer, write_catalog

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "console.png"

pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium here: scripts/test installs it with apt-get "
                                                        "where it can; the console's browser test is skipped")


class Page:
    """One browser tab spoken to over the DevTools protocol."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket, self._ids = socket, itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        await self._socket.send_json({"id": message_id, "method": method, "params": params})
        while True:
            reply = json.loads((await asyncio.wait_for(self._socket.receive(), 15)).data)
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 15) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                text = await self.evaluate("document.body && document.body.innerText.slice(0, 800)")
                raise AssertionError(f"{what}: not seen within {timeout} s; the page says: {text!r}")
            await asyncio.sleep(0.2)


CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", event => window.__cspViolations.push(
  `${event.effectiveDirective} blocked ${event.blockedURI || "inline"} at ${event.sourceFile}:${event.lineNumber}`));
"""


async def assert_no_csp_violations(page: Page) -> None:
    violations = await page.evaluate("window.__cspViolations")
    assert violations == [], violations


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Page]:
    assert BROWSER is not None
    profile = tmp_path / "profile"
    process = subprocess.Popen([BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                target = next(t for t in await response.json() if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024) as socket:
                page = Page(socket)
                await page.send("Page.enable")
                await page.send("Network.enable")
                # Before any of the page's own code: every CSP violation the browser reports.
                await page.send("Page.addScriptToEvaluateOnNewDocument", source=CSP_LISTENER)
                yield page
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


async def test_the_console_follows_a_batch_live_and_retries_a_failed_device(tmp_path: Path, browser: Page) -> None:
    write_catalog(tmp_path, """
    - {name: up-1.1.0, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}
    """)
    server = await OtaServer(tmp_path).start()
    devices = [Device(server, name) for name in ("cam-01", "cam-02", "cam-03", "cam-04")]
    try:
        for device in devices:
            await device.__aenter__()
            await device.inform("1.0.0")
            await device.next_push()
        done, working, failing, _ = devices
        await done.progress(100)
        await done.inform("1.1.0")
        await working.progress(30, "downloading")
        await failing.progress(-2, "download failed: CRC mismatch")
        await server.wait_state("cam-03", "failed")

        # The browser login, as a user gives it: any name, the admin token as password.
        await browser.send("Page.navigate", url=server.http_url.replace("://", f"://admin:{server.admin_token}@") + "/admin/")
        await browser.wait_for("document.querySelectorAll('tr[data-batch] .bar span').length >= 3",
                               "the batch's progress bar with succeeded, in_progress and failed parts")
        assert "50%" in await browser.evaluate("document.querySelector('tr[data-batch] td.num').innerText")  # done: succeeded + failed
        # The bar's parts are sized from JS under the CSP (CSSOM, not style attributes).
        widths = await browser.evaluate("[...document.querySelectorAll('tr[data-batch] .bar span')]"
                                        ".map(part => part.getBoundingClientRect().width)")
        assert all(width > 0 for width in widths), widths
        await assert_no_csp_violations(browser)
        await browser.evaluate("window.__sameDocument = true")  # gone if the page reloads

        await browser.evaluate("location.hash = '#/batch/up-1.1.0'")
        row = "document.querySelector('tr[data-device=\"cam-02\"]')"
        await browser.wait_for(f"{row} && {row}.dataset.state === 'in_progress'", "cam-02 in progress")
        await working.progress(100)  # the device moves on: the page follows without a reload
        await browser.wait_for(f"{row}.dataset.state === 'installed'", "cam-02 installed, live")
        assert await browser.evaluate("window.__sameDocument === true"), "the page reloaded"
        message = await browser.evaluate("document.querySelector('tr[data-device=\"cam-03\"]').innerText")
        assert "download failed: CRC mismatch" in message and "-2" in message

        await browser.evaluate("window.alert = message => { window.__alerts = (window.__alerts || []).concat([message]); }")
        await browser.evaluate(f"document.getElementById('token').value = {json.dumps(server.admin_token)}")
        await browser.evaluate("document.getElementById('retry-failed').click()")
        await asyncio.sleep(0.5)
        assert not await browser.evaluate("window.__alerts"), await browser.evaluate("window.__alerts")
        push = await failing.next_push(timeout=10)  # the retry gave cam-03 a new job, pushed at once
        assert push["data"]["version"] == "1.1.0"
        await browser.wait_for("document.querySelector('tr[data-device=\"cam-03\"]').dataset.state === 'notified'",
                               "cam-03 notified again after the retry")

        await browser.evaluate("location.hash = '#/devices'")
        await browser.wait_for("!!document.querySelector('tr[data-device=\"cam-04\"]')", "the device list")
        await browser.evaluate("location.hash = '#/device/a1Test/cam-03'")
        await browser.wait_for("document.querySelectorAll('h2').length >= 2", "cam-03's page with its jobs")
        await browser.evaluate("location.hash = '#/'")
        await browser.wait_for("document.querySelectorAll('tr[data-batch] .bar span').length >= 3", "overview again")
        await assert_no_csp_violations(browser)
        # The policy is in force and the listener hears it: an inline style is refused, and reported.
        refused = await browser.evaluate("""(() => { const probe = document.createElement("div");
            probe.id = "csp-probe"; probe.setAttribute("style", "width: 7px"); document.body.append(probe);
            return probe.style.width === ""; })()""")
        assert refused, "an inline style attribute was applied: no Content-Security-Policy in force"
        await browser.wait_for("window.__cspViolations.some(v => v.startsWith('style-src'))",
                               "the violation of the inline style, reported", timeout=5)
        await browser.evaluate("document.getElementById('csp-probe').remove()")
        if os.environ.get("OTA_CONSOLE_SCREENSHOT"):  # docs/console.png: OTA_CONSOLE_SCREENSHOT=1 ./scripts/test -k console
            shot = await browser.send("Page.captureScreenshot", format="png")
            SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
    finally:
        for device in devices:
            await device.__aexit__(None, None, None)
        await server.stop()
