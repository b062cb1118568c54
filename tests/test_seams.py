"""The two seams of otacore (docs/architecture.md), driven from outside the embedded broker:
a second DeviceLink (as a worker on a broker cluster would be) feeds DeviceMessages and
receives what the engine sends, over a real engine on a real SQLite journal. No broker and
no sockets: the seam is an in-process interface."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from otacore.engine import OtaEngine
from otacore.messaging import DeviceMessages
from otacore.config.settings import settings_from_mapping
from otacore.protocol.codec import decode_block_reply
from otacore.protocol.credentials import DeviceId
from otacore.protocol.topics import FILE_DOWNLOAD, FIRMWARE_GET, INFORM
from otacore.storage.journal import Journal
from otacore.storage.store import Store
from support.harness import PK, UPGRADE_BATCH, write_catalog

DEVICE = DeviceId(PK, "d1")


class RecordingLink:
    """A DeviceLink whose devices are all online; it keeps what it was handed, and the
    journal's commit count at that moment."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.sent: list[tuple[str, bytes, int]] = []  # topic, payload, commits before it

    def is_online(self, device: DeviceId) -> bool:
        return device == DEVICE

    def send(self, device: DeviceId, topic: str, payload: bytes, qos: int) -> bool:
        self.sent.append((topic, payload, self.journal.commits))
        return True


async def start(tmp_path: Path, batches: str) -> tuple[OtaEngine, DeviceMessages, RecordingLink, Journal]:
    write_catalog(tmp_path, batches)
    settings = settings_from_mapping({"catalog": str(tmp_path / "ota.yaml"), "data_dir": str(tmp_path / "var"),
                                      "http": {"public_url": "http://127.0.0.1:9"}}, tmp_path / "broker.yaml")
    settings.data_dir.mkdir(parents=True)
    database = settings.data_dir / "ota.sqlite3"
    store = await Store.open(database)
    journal = Journal.open(database, time.time)
    link = RecordingLink(journal)
    engine = OtaEngine(settings, store, journal, link, b"seam-test-key-0123456789abcdef!!")
    engine.start()
    await engine.reload()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(work):  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return engine, DeviceMessages(engine, link, spawn), link, journal


async def stop(engine: OtaEngine) -> None:
    await engine.stop()
    await engine.store.close()


async def test_a_report_through_the_seam_is_acknowledged_after_its_promise_and_pushed_after_commit(
        tmp_path: Path) -> None:
    engine, messages, link, journal = await start(tmp_path, UPGRADE_BATCH)
    try:
        report = json.dumps({"id": "1", "params": {"version": "1.0.0"}}).encode()
        topic = f"/ota/device/inform/{PK}/d1"
        commits = journal.commits
        ack = messages.receive(DEVICE, INFORM, topic, report)
        assert ack is not True  # it made a promise (a job): acknowledge once on disk
        await ack
        assert journal.commits > commits
        for _ in range(100):
            if link.sent:
                break
            await asyncio.sleep(0.02)
        [(push_topic, payload, commits_before_push)] = link.sent
        assert push_topic == f"/ota/device/upgrade/{PK}/d1" and commits_before_push > commits
        push = json.loads(payload)
        assert push["data"]["version"] == "1.1.0"
        assert messages.receive(DEVICE, INFORM, topic, report) is True  # the same report again: nothing new
        assert messages.received[INFORM] == 2
    finally:
        await stop(engine)


async def test_firmware_get_and_blocks_answer_through_the_link(tmp_path: Path) -> None:
    engine, messages, link, journal = await start(tmp_path, UPGRADE_BATCH)
    try:
        ack = messages.receive(DEVICE, INFORM, "t", json.dumps({"id": "1", "params": {"version": "1.0.0"}}).encode())
        assert ack is not True
        await ack
        get = json.dumps({"id": "7", "params": {}}).encode()
        link.sent.clear()
        messages.receive(DEVICE, FIRMWARE_GET, "t", get)
        block = json.dumps({"id": "9", "params": {"fileToken": "x", "fileInfo": {"streamId": 999_999, "fileId": 1},
                                                   "fileBlock": {"size": 1024, "offset": 0}}}).encode()
        messages.receive(DEVICE, FILE_DOWNLOAD, "t", block)
        for _ in range(100):
            if len(link.sent) == 2:
                break
            await asyncio.sleep(0.02)
        topics = {topic: payload for topic, payload, _ in link.sent}
        reply = json.loads(topics[f"/sys/{PK}/d1/thing/ota/firmware/get_reply"])
        assert reply["id"] == "7" and reply["code"] == 200 and reply["data"]["version"] == "1.1.0"
        header, body = decode_block_reply(topics[f"/sys/{PK}/d1/thing/file/download_reply"])
        assert header["id"] == "9" and header["code"] == 404 and not body
    finally:
        await stop(engine)
