"""The upgrade description a device gets (docs/protocol.md 3b `data`): the one shape shared by the
push, the firmware/get reply and the HTTP get_ota_info answer."""
from __future__ import annotations

import json
from typing import Any

from otacore.catalog.model import DEFAULT_MODULE, Package
from otacore.downloads.package_files import DownloadFile


def offer_data(package: Package, download: DownloadFile, *, url: str | None, stream_id: int | None) -> dict[str, Any]:
    """`url` for http/https batches; `stream_id` (the job id) for mqtt ones."""
    sign = download.digest.sign(package.sign_method)
    data: dict[str, Any] = {"size": download.digest.size, "version": package.version}
    if url is not None:
        data["url"] = url
    else:
        data.update({"dProtocol": "mqtt", "streamId": stream_id, "streamFileId": 1})
    # Aliyun's device SDKs compare against these spellings exactly.
    data["sign"] = sign
    data["signMethod"] = "Md5" if package.sign_method == "MD5" else "SHA256"
    if package.sign_method == "MD5":
        data["md5"] = sign
    if package.module != DEFAULT_MODULE:
        data["module"] = package.module
    if download.is_diff:
        data["isDiff"] = 1
    ext: dict[str, Any] = dict(package.ext_data)
    if package.notice:
        ext["_package_udi"] = json.dumps({"ota_notice": package.notice}, ensure_ascii=False)
    if download.is_diff:
        ext["_target_size"] = download.target.size
        ext["_target_sign"] = download.target.sign(package.sign_method)
    if ext:
        data["extData"] = ext
    return data
