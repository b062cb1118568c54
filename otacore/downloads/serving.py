"""Serving a job's file: signed URLs, who may fetch what, MQTT blocks (docs/protocol.md 3e, 5),
and the bytes served per job, which the engine reads as activity.

Everything is decided from memory (the job as the engine holds it); bytes served are
telemetry, written by the journal with its next commit.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from collections import Counter
from collections.abc import Callable

from otacore.downloads.block_cache import BlockCache
from otacore.protocol.codec import BlockRequest, encode_block_reply
from otacore.protocol.credentials import DeviceId
from otacore.errors import Refused
from otacore.fleet.state import FleetState
from otacore.fleet.jobs import Job
from otacore.downloads.package_files import DownloadFile, PackageFiles, log_unreadable
from otacore.downloads.signed_urls import sign_url, verify_url

log = logging.getLogger("ota.downloads")


class Downloads:
    def __init__(self, state: FleetState, url_key: bytes, clock: Callable[[], float]) -> None:
        self.state = state
        self._url_key = url_key
        self._clock = clock
        self.files: PackageFiles | None = None  # the live catalog's files (applying a catalog sets them)
        self._blocks = BlockCache()
        self._in_flight: Counter[int] = Counter()  # job id -> HTTP transfers under way
        # Package bytes sent to devices, for GET /metrics: completed HTTP transfers (a
        # broken one counts 0, as in `finished`) and MQTT blocks.
        self.bytes_http = 0
        self.bytes_mqtt = 0

    def file_of(self, job: Job) -> DownloadFile | None:
        """The file this job was given (None once a reload removed it)."""
        return self.files.by_key(job.file_key) if self.files is not None else None

    def url(self, base_url: str, download: DownloadFile, job: Job, ttl_seconds: int) -> str:
        return sign_url(self._url_key, base_url, download.key, download.name, job.device, job.id, ttl_seconds)

    def check_url(self, raw_path: str, query: dict[str, str]) -> tuple[DeviceId, int]:
        """The (device, job id) a signed URL was issued for; UrlRejected if forged or expired."""
        return verify_url(self._url_key, raw_path, query)

    def file_token(self, job_id: int) -> str:
        return hmac.new(self._url_key, f"stream:{job_id}".encode(), hashlib.sha256).hexdigest()[:32]

    def authorize(self, device: DeviceId, job_id: int, file_key: str) -> DownloadFile:
        """The file a signed URL may fetch: the job must be this device's, open, and for this file."""
        job = self.state.jobs.get(job_id)
        download = self.file_of(job) if job is not None else None
        if job is None or job.device != device or download is None or download.key != file_key:
            raise Refused(403, "this URL is not valid for that device and file")
        if not job.is_open:
            raise Refused(403, f"job {job_id} is {job.state}; ask the server for a new URL")
        if not download.is_current():
            log.error("%s changed on disk since it was hashed; run `otactl reload` (a new build needs a new "
                      "package id)", download.path)
            raise Refused(409, "the package file changed on the server; try again later")
        return download

    def _count(self, job_id: int, count: int) -> None:
        # Serving bytes is activity too: a device downloading silently has not timed out.
        job = self.state.jobs.get(job_id)
        if job is not None:
            self.state.update(job, self._clock(), bytes_served=job.bytes_served + count)

    def started(self, job_id: int) -> None:
        """A device is fetching this job's file: it is active, whatever it has reported."""
        self._in_flight[job_id] += 1
        self._count(job_id, 0)

    def finished(self, job_id: int, count: int) -> None:
        """`count`: bytes sent (0 when the transfer broke off; aiohttp cannot say how many)."""
        self._in_flight[job_id] -= 1
        if self._in_flight[job_id] <= 0:
            del self._in_flight[job_id]
        self.bytes_http += count
        self._count(job_id, count)

    def in_flight(self, job_id: int) -> bool:
        return job_id in self._in_flight

    async def block(self, device: DeviceId, request: BlockRequest) -> bytes:
        """Answer a block request with the binary reply frame."""
        def error(code: int, message: str) -> bytes:
            return encode_block_reply({"id": request.id, "code": code, "msg": message}, None)

        job = self.state.jobs.get(request.stream_id)
        download = self.file_of(job) if job is not None else None
        if job is None or download is None or request.file_id != 1:
            return error(404, f"unknown stream {request.stream_id}/{request.file_id}")
        if job.device != device:
            return error(403, "stream not assigned to this device")
        if not job.is_open:
            return error(403, f"stream closed: job is {job.state}")
        # A fileToken in the request is not checked: the stream is already bound to this
        # authenticated device and its open job, and Aliyun's C Link SDK 4.x always sends
        # "default" instead of the token it was given.
        token = self.file_token(job.id)
        size = download.digest.size
        if request.offset >= size:
            return error(400, f"offset {request.offset} is at or past the end ({size} bytes)")
        if not download.is_current():
            return error(404, "the package file changed on the server since it was hashed")
        try:
            tail = await self._blocks.block_with_crc(download, request.offset, request.size)  # block + CRC
        except OSError as exc:
            log_unreadable(download.path, exc)
            return error(503, "the server cannot read the package file; try again later")
        if tail is None:
            return error(404, "the package file changed on the server since it was hashed")
        self._count(job.id, len(tail) - 2)
        self.bytes_mqtt += len(tail) - 2
        header = {"id": request.id, "code": 200, "msg": "success",
                  "data": {"fileToken": token, "fileLength": size, "bSize": len(tail) - 2, "bOffset": request.offset}}
        return encode_block_reply(header, None) + tail
