"""Package files that cannot be served: a symlink loop, a dangling symlink, a folder or a FIFO
where the image belongs, a file nobody may read; found when the catalog is loaded, or gone
bad after. `otactl validate` and `ota-server` say so in one line, a reload changes nothing,
and a device asking for such a file gets an error answer, never silence or a traceback.

Root reads any file whatever its mode: for the unreadable file, as root, the server and
otactl run in a user namespace (`unshare --user`), where they do not have that power."""
from __future__ import annotations

import os
import shutil
import subprocess
import types
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from support.harness import BASE_CATALOG, MQTT_BATCH, UPGRADE_BATCH, Device, OtaServer, free_port, write_catalog
from support.processes import LiveServer, ota_server_exit, otactl, write_broker_yaml
from otacore.catalog.loading import prepare_catalog
from otacore.protocol.codec import decode_block_reply
from otacore.errors import ConfigError
from otacore.config.settings import settings_from_mapping


def _unprivileged_prefix() -> list[str] | None:
    """What makes a command unable to read a mode-000 file: nothing for a normal user; for
    root a user namespace; None when neither is possible here."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "--user", "true"], capture_output=True, timeout=10)
    return ["unshare", "--user"] if probe.returncode == 0 else None


UNPRIVILEGED = _unprivileged_prefix()
needs_unprivileged = pytest.mark.skipif(UNPRIVILEGED is None, reason="running as root without user namespaces "
                                        "(unshare --user): root reads a file whatever its mode")


def loop(path: Path) -> None:
    (path.parent / "other.bin").symlink_to(path.name)
    path.symlink_to("other.bin")


def dangling(path: Path) -> None:
    path.symlink_to("nowhere.bin")


def folder(path: Path) -> None:
    path.mkdir()


def fifo(path: Path) -> None:
    os.mkfifo(path)


BREAKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "symlink loop": (loop, "symlink loop"),
    "dangling symlink": (dangling, "nowhere.bin, which does not exist"),
    "folder": (folder, "is a folder, not a file"),
    "fifo": (fifo, "not a regular file"),
}


def line_of(path: Path, text: str) -> int:
    return next(number for number, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def break_package(root: Path, how: Callable[[Path], None]) -> Path:
    """The catalog, with fw-1.1.0's file broken `how`."""
    catalog = write_catalog(root)
    image = root / "packages" / "fw-1.1.0.bin"
    image.unlink()
    how(image)
    return catalog


def assert_one_line_error(output: str, catalog: Path, says: str) -> None:
    assert "Traceback" not in output, output
    first = output.strip().splitlines()[0]
    assert f"{catalog}:{line_of(catalog, 'fw-1.1.0.bin')}: packages[1].file: " in first, output
    assert says in first, output


# -- at load: otactl validate, ota-server, reload ------------------------------------------

@pytest.mark.parametrize("name", BREAKS)
def test_validate_and_start_refuse_in_one_line(tmp_path: Path, name: str) -> None:
    how, says = BREAKS[name]
    catalog = break_package(tmp_path, how)
    config = write_broker_yaml(tmp_path, free_port(), free_port())
    validate = otactl(config, "validate")
    assert validate.returncode == 1
    assert_one_line_error(validate.stdout, catalog, says)
    assert "Traceback" not in validate.stderr
    start = ota_server_exit(config)
    assert start.returncode == 1 and len(start.stderr.strip().splitlines()) == 1, start.stderr
    assert start.stderr.startswith("ota-server: ")
    assert_one_line_error(start.stderr.removeprefix("ota-server: "), catalog, says)


@needs_unprivileged
def test_an_unreadable_file_is_refused_even_with_its_hash_cached(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path)
    config = write_broker_yaml(tmp_path, free_port(), free_port())
    assert otactl(config, "validate", prefix=UNPRIVILEGED or []).returncode == 0
    (tmp_path / "packages" / "fw-1.1.0.bin").chmod(0)  # same size and mtime: the hash cache still matches
    validate = otactl(config, "validate", prefix=UNPRIVILEGED or [])
    assert validate.returncode == 1
    assert_one_line_error(validate.stdout, catalog, "not readable by the server's user")
    start = ota_server_exit(config, prefix=UNPRIVILEGED or [])
    assert start.returncode == 1 and len(start.stderr.strip().splitlines()) == 1, start.stderr
    assert_one_line_error(start.stderr.removeprefix("ota-server: "), catalog, "not readable")


@pytest.mark.parametrize("name", BREAKS)
async def test_a_reload_naming_a_bad_file_answers_400_and_changes_nothing(server: OtaServer, name: str) -> None:
    how, says = BREAKS[name]
    how(server.root / "packages" / "fw-2.0.0.bin")
    catalog = write_catalog(server.root, UPGRADE_BATCH, base=BASE_CATALOG + "  - {id: fw-2.0.0, product: a1Test, "
                            "version: 2.0.0, file: fw-2.0.0.bin}\n")
    before = server.engine.catalog
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.admin_token}"}) as http:
        async with http.post(f"{server.http_url}/admin/api/reload") as response:
            body = await response.json()
            assert response.status == 400, body
        async with http.get(f"{server.http_url}/files/fw-1.1.0/fw-1.1.0.bin") as response:
            assert response.status == 200 and len(await response.read()) == 160_000  # still served
    [error] = body["errors"]
    assert error.startswith(f"{catalog}:{line_of(catalog, 'fw-2.0.0.bin')}: packages[2].file: ") and says in error
    assert server.engine.catalog is before and "fw-2.0.0" not in server.engine.catalog.packages


# -- gone bad after load: MQTT blocks and HTTP downloads ---------------------------------------

async def ask_block(device: Device, stream: int, offset: int) -> dict:
    params = {"fileInfo": {"streamId": stream, "fileId": 1}, "fileBlock": {"size": 4096, "offset": offset}}
    await device.publish(f"/sys/a1Test/{device.name}/thing/file/download", {"id": "7", "params": params})
    header, _ = decode_block_reply(await device.receive("download_reply"))
    return header


def gone(path: Path) -> None:
    """Deleted: nothing put in its place."""


@pytest.mark.parametrize("how", [gone, folder, fifo], ids=["deleted", "folder", "fifo"])
async def test_a_file_gone_bad_after_load_gets_error_answers(mqtt_server: OtaServer, how: Callable[[Path], None],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    image = mqtt_server.root / "packages" / "fw-1.1.0.bin"
    async with Device(mqtt_server, "bad-1") as device:
        await device.inform("1.0.0")
        stream = (await device.next_push())["data"]["streamId"]
        assert (await ask_block(device, stream, 0))["code"] == 200
        image.unlink()
        how(image)
        header = await ask_block(device, stream, 8192)
        assert header["code"] == 404 and "changed on the server" in header["msg"]
    async with aiohttp.ClientSession() as http, http.get(
            f"{mqtt_server.http_url}/files/fw-1.1.0/fw-1.1.0.bin",
            headers={"Authorization": f"Bearer {mqtt_server.admin_token}"}) as response:
        assert response.status == 409 and "changed on disk" in (await response.json())["message"]
    assert not [record for record in caplog.records if record.exc_info], "a traceback in the log"


@needs_unprivileged
async def test_a_file_made_unreadable_after_load_gets_503_answers(tmp_path: Path) -> None:
    write_catalog(tmp_path, MQTT_BATCH)
    server = await LiveServer(tmp_path, prefix=UNPRIVILEGED or []).start()
    mqtt_port, http_port = server.mqtt_port, server.http_port
    output = ""
    try:
        admin = {"Authorization": f"Bearer {(tmp_path / 'var' / 'admin-token').read_text().strip()}"}
        async with Device(types.SimpleNamespace(mqtt_port=mqtt_port), "bad-2") as device:  # type: ignore[arg-type]
            await device.inform("1.0.0")
            stream = (await device.next_push())["data"]["streamId"]
            (tmp_path / "packages" / "fw-1.1.0.bin").chmod(0)
            header = await ask_block(device, stream, 0)
            assert header["code"] == 503 and "cannot read" in header["msg"]
        async with aiohttp.ClientSession(headers=admin) as http:
            async with http.get(f"http://127.0.0.1:{http_port}/files/fw-1.1.0/fw-1.1.0.bin") as response:
                assert response.status == 503 and "cannot read" in (await response.json())["message"]
            async with http.post(f"http://127.0.0.1:{http_port}/admin/api/reload") as response:
                body = await response.json()
                assert response.status == 400 and "not readable" in body["errors"][0], body
    finally:
        output = await server.stop()
    assert "Traceback" not in output
    assert output.count("cannot read") == 1, output  # said once, not once per request


# -- data_dir files that are not what they should be -------------------------------------------

def test_a_broken_hash_cache_is_rebuilt(tmp_path: Path) -> None:
    write_catalog(tmp_path)
    settings = settings_from_mapping({"catalog": "ota.yaml", "data_dir": "var"}, tmp_path / "broker.yaml")
    cache = tmp_path / "var" / "file-hashes.json"
    cache.parent.mkdir()
    for content in ('[1, 2]', '{"x": 5, "y": {"stamp": "z"}}', "{not json"):
        cache.write_text(content)
        assert prepare_catalog(settings).files.by_key("fw-1.1.0") is not None
    cache.unlink()
    cache.mkdir()  # a folder in its place: neither read nor written, still no error
    assert prepare_catalog(settings).files.by_key("fw-1.1.0") is not None


def test_a_patch_that_cannot_be_built_is_a_catalog_error(tmp_path: Path) -> None:
    base = BASE_CATALOG.replace("file: fw-1.1.0.bin,", "file: fw-1.1.0.bin, diff_from: [1.0.0],")
    catalog = write_catalog(tmp_path, base=base)
    settings = settings_from_mapping({"catalog": "ota.yaml", "data_dir": "var"}, tmp_path / "broker.yaml")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "diffs").write_text("a file where the diffs folder belongs")
    with pytest.raises(ConfigError) as refused:
        prepare_catalog(settings)
    [issue] = refused.value.issues
    assert str(issue).startswith(f"{catalog}:{line_of(catalog, 'fw-1.1.0.bin')}: packages[fw-1.1.0].diff_from: ")
    assert "cannot build the patch from 1.0.0" in issue.message
