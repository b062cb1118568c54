"""`otactl` for daily work, as a user runs it: `package add` on a commented catalog (the file
changes by the new entry only; refusals, file-system errors included, are one line and change
nothing; the copy never has wider permissions than the image), `devices` against a running
`ota-server` (paging, filters, table, JSON), `--json` on every read command, `status --watch`
on a pipe and on a terminal, and the exit codes scripts rely on."""
from __future__ import annotations

import asyncio
import difflib
import fcntl
import hashlib
import json
import os
import pty
import resource
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

from support.harness import BASE_CATALOG, UPGRADE_BATCH, Device, free_port, make_firmware, write_catalog
from support.processes import BIN, LiveServer, ordinary_user, otactl, write_broker_yaml

REPO = Path(__file__).resolve().parents[1]


def demo_catalog(root: Path) -> Path:
    """The repository's demo catalog (comments, block style) and its images, and a broker.yaml."""
    shutil.copy(REPO / "config" / "ota.yaml", root / "ota.yaml")
    shutil.copytree(REPO / "config" / "packages", root / "packages")
    return write_broker_yaml(root, free_port(), free_port())


def changes(before: str, after: str) -> tuple[list[str], list[str]]:
    """(removed lines, added lines) from before to after."""
    diff = list(difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0))
    removed = [line[1:] for line in diff if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    return removed, added


def snapshot(root: Path) -> tuple[bytes, dict[str, bytes]]:
    return (root / "ota.yaml").read_bytes(), {p.name: p.read_bytes() for p in (root / "packages").iterdir()}


def test_package_add_changes_the_commented_catalog_by_the_new_entry_only(tmp_path: Path) -> None:
    config = demo_catalog(tmp_path)
    before = (tmp_path / "ota.yaml").read_text()
    image = make_firmware(tmp_path / "incoming" / "cam-fw-1.2.0.bin", 90_000, 7)
    result = otactl(config, "package", "add", str(tmp_path / "incoming" / "cam-fw-1.2.0.bin"),
                    "--product", "a1DemoCam", "--version", "1.2.0")
    assert result.returncode == 0, result.stderr
    assert "added package a1DemoCam-default-1.2.0" in result.stdout
    assert hashlib.sha256(image).hexdigest() in result.stdout and hashlib.md5(image).hexdigest() in result.stdout
    assert "otactl plan" in result.stdout and "otactl reload" in result.stdout
    assert (tmp_path / "packages" / "cam-fw-1.2.0.bin").read_bytes() == image
    after = (tmp_path / "ota.yaml").read_text()
    removed, added = changes(before, after)
    assert removed == []
    assert added == ["  - id: a1DemoCam-default-1.2.0", "    product: a1DemoCam", "    version: 1.2.0",
                     "    file: cam-fw-1.2.0.bin", "    sign_method: SHA256"]
    assert after.index("cam-fw-1.2.0.bin") < after.index("batches:")  # with the packages, before the batches
    assert "# Demo catalog" in after and "# a listed secret overrides the derived one" in after

    # The same image again as another module's package: an identical file is not copied again.
    again = otactl(config, "package", "add", str(tmp_path / "incoming" / "cam-fw-1.2.0.bin"), "--product",
                   "a1DemoCam", "--version", "1.2.0", "--module", "MCU", "--id", "mcu-1.2.0", "--sign-method", "MD5")
    assert again.returncode == 0, again.stderr
    assert "is already this file" in again.stdout and "added package mcu-1.2.0" in again.stdout
    removed, added = changes(after, (tmp_path / "ota.yaml").read_text())
    assert removed == [] and added == ["  - id: mcu-1.2.0", "    product: a1DemoCam", "    module: MCU",
                                       "    version: 1.2.0", "    file: cam-fw-1.2.0.bin", "    sign_method: MD5"]
    validate = otactl(config, "validate", "--json")
    assert validate.returncode == 0 and json.loads(validate.stdout)["packages"] == 4


def test_package_add_writes_a_flow_entry_into_a_flow_style_list(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH, base="# fleet catalog\n" + BASE_CATALOG)
    config = write_broker_yaml(tmp_path, free_port(), free_port())
    before = (tmp_path / "ota.yaml").read_text()
    make_firmware(tmp_path / "fw-on.bin", 1000, 9)
    result = otactl(config, "package", "add", str(tmp_path / "fw-on.bin"), "--product", "a1Test", "--version",
                    "2.0.0", "--id", "on")  # `on` is true in YAML 1.1: it must be quoted
    assert result.returncode == 0, result.stderr
    removed, added = changes(before, (tmp_path / "ota.yaml").read_text())
    assert removed == []
    assert added == ["  - {id: 'on', product: a1Test, version: 2.0.0, file: fw-on.bin, sign_method: SHA256}"]
    assert otactl(config, "validate").returncode == 0


def test_package_add_refusals_change_nothing(tmp_path: Path) -> None:
    config = demo_catalog(tmp_path)
    make_firmware(tmp_path / "incoming" / "new.bin", 5000, 1)
    make_firmware(tmp_path / "incoming" / "cam-fw-1.0.0.bin", 5000, 2)  # the name of another image
    (tmp_path / "incoming" / "new.exe").write_bytes(b"MZ")
    (tmp_path / "incoming" / "empty.bin").write_bytes(b"")
    untouched = snapshot(tmp_path)
    new = str(tmp_path / "incoming" / "new.bin")
    cases = [
        ([str(tmp_path / "incoming" / "cam-fw-1.0.0.bin"), "--product", "a1DemoCam", "--version", "1.2.0"],
         "exists with other content"),
        ([new, "--product", "a1Nope", "--version", "1.2.0"], "unknown product 'a1Nope'"),  # the loader's word
        ([new, "--product", "a1DemoCam", "--version", "1.1.0"], "already has full package 'cam-fw-1.1.0'"),
        ([new, "--product", "a1DemoCam", "--version", "1.2.0", "--module", "GPU"], "has no module 'GPU'"),
        ([new, "--product", "a1DemoCam", "--version", "1.2.0", "--id", "cam-fw-1.1.0"], "is taken"),
        ([new, "--product", "a1DemoCam", "--version", "1.2"], "--version '1.2' is not valid"),
        ([new, "--product", "a1DemoCam", "--version", "1.2.0", "--id", "a/b"], "--id 'a/b' is not valid"),
        ([str(tmp_path / "incoming" / "missing.bin"), "--product", "a1DemoCam", "--version", "1.2.0"],
         "does not exist"),
        ([str(tmp_path / "incoming" / "new.exe"), "--product", "a1DemoCam", "--version", "1.2.0"], "ending"),
        ([str(tmp_path / "incoming" / "empty.bin"), "--product", "a1DemoCam", "--version", "1.2.0"], "is empty"),
    ]
    for args, reason in cases:
        result = otactl(config, "package", "add", *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert reason in result.stderr and "nothing was changed" in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert snapshot(tmp_path) == untouched, args
    usage = otactl(config, "package", "add", new, "--product", "a1DemoCam")  # no --version
    assert usage.returncode == 1 and "--version" in usage.stderr
    assert snapshot(tmp_path) == untouched


def test_package_add_file_system_edges_are_one_line_and_change_nothing(tmp_path: Path) -> None:
    config = demo_catalog(tmp_path)
    incoming = tmp_path / "incoming"
    make_firmware(incoming / "fw.bin", 50_000, 3)
    (incoming / "folder.bin").mkdir()
    os.mkfifo(incoming / "fifo.bin")  # opening it to read would wait for a writer forever
    (incoming / "dangling.bin").symlink_to(incoming / "gone.bin")
    (incoming / "loop.bin").symlink_to(incoming / "loop.bin")
    untouched = snapshot(tmp_path)

    def refused(source: str, reason: str, limit_bytes: int | None = None) -> None:
        command = [str(BIN / "otactl"), "--config", str(config), "package", "add", source, "--product", "a1DemoCam",
                   "--version", "1.2.0"]
        # RLIMIT_FSIZE: a real write failure (EFBIG) even for root, partway through the copy.
        limit = None if limit_bytes is None else \
            (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes)))
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, preexec_fn=limit)
        assert result.returncode == 1, (source[-60:], result.stdout, result.stderr)
        assert reason in result.stderr and "nothing was changed" in result.stderr, (source[-60:], result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert snapshot(tmp_path) == untouched, source[-60:]  # no half copy, no temporary file left

    refused(str(incoming / ("n" * 252 + ".bin")), "(File name too long); check the path")  # 256 bytes
    refused(str(incoming / "folder.bin"), "is not a regular file (a folder)")
    refused(str(incoming / "fifo.bin"), "is not a regular file (a FIFO, socket or device)")
    refused(str(incoming / "dangling.bin"), "is a symlink to a missing file")
    refused(str(incoming / "loop.bin"), "(Too many levels of symbolic links)")
    refused(str(incoming / "fw.bin"), f"cannot copy {incoming / 'fw.bin'} into {tmp_path / 'packages'} (File too "
            "large)", limit_bytes=20_000)


def test_package_add_permission_errors_are_one_line_and_change_nothing(tmp_path: Path) -> None:
    """An unreadable image and a packages_dir the user may not write: as an ordinary user
    (root reads and writes anything: then otactl runs as `nobody` through setpriv, in a folder
    `nobody` can reach)."""
    with ordinary_user(tmp_path, "otactl-perm-") as (unprivileged, root):
        config = demo_catalog(root)
        make_firmware(root / "incoming" / "secret.bin", 5000, 5)
        make_firmware(root / "incoming" / "fw.bin", 5000, 6)
        for path in (root / "ota.yaml", root / "incoming" / "fw.bin"):
            path.chmod(0o666)
        (root / "incoming" / "secret.bin").chmod(0o000 if not unprivileged else 0o600)  # nobody cannot read it
        (root / "packages").chmod(0o555)  # nobody may write here
        try:
            untouched = snapshot(root)
            for source, reason in ((root / "incoming" / "secret.bin", "cannot read"),
                                   (root / "incoming" / "fw.bin", "cannot copy")):
                result = otactl(config, "package", "add", str(source), "--product", "a1DemoCam", "--version", "1.2.0",
                                prefix=unprivileged)
                assert result.returncode == 1, (source, result.stdout, result.stderr)
                assert f"{reason} {source}" in result.stderr and "(Permission denied)" in result.stderr, result.stderr
                assert "nothing was changed" in result.stderr and len(result.stderr.strip().splitlines()) == 1
                assert snapshot(root) == untouched
        finally:
            (root / "packages").chmod(0o755)


def test_package_add_takes_a_255_byte_file_name(tmp_path: Path) -> None:
    config = demo_catalog(tmp_path)
    name = "n" * 251 + ".bin"  # the longest a file system takes: no room for a longer temporary name
    image = make_firmware(tmp_path / "incoming" / name, 5000, 4)
    result = otactl(config, "package", "add", str(tmp_path / "incoming" / name), "--product", "a1DemoCam",
                    "--version", "1.2.0")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "packages" / name).read_bytes() == image
    assert not [p.name for p in (tmp_path / "packages").iterdir() if p.name.startswith(".")]
    assert otactl(config, "validate").returncode == 0


def test_package_add_shows_a_hostile_file_name_escaped(tmp_path: Path) -> None:
    config = demo_catalog(tmp_path)
    name = "fw\n\x1b[31mok\u202e.bin"  # a newline, a terminal colour, a right-to-left override
    make_firmware(tmp_path / "incoming" / name, 5000, 5)
    result = otactl(config, "package", "add", str(tmp_path / "incoming" / name), "--product", "a1DemoCam",
                    "--version", "1.2.0")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\u202e" not in result.stdout
    copied = result.stdout.splitlines()[0]
    assert copied.startswith("copied ") and "fw\\n\\x1b[31mok\\u202e.bin" in copied, copied
    assert (tmp_path / "packages" / name).is_file()


def test_package_add_never_widens_the_images_permissions(tmp_path: Path) -> None:
    """The copy keeps the source's permission bits, at most 0644 (docs/operations.md): a
    private image stays private, even named through a symlink; nothing becomes executable."""
    config = demo_catalog(tmp_path)
    for version, (name, mode, expected) in enumerate((("private.bin", 0o600, 0o600), ("group.bin", 0o640, 0o640),
                                                      ("tool.bin", 0o755, 0o644), ("shared.bin", 0o666, 0o644)), 2):
        source = tmp_path / "incoming" / name
        make_firmware(source, 5000, version)
        source.chmod(mode)
        link = tmp_path / "links" / name
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(source)
        result = otactl(config, "package", "add", str(link), "--product", "a1DemoCam", "--version",
                        f"{version}.0.0")
        assert result.returncode == 0, result.stderr
        copied = tmp_path / "packages" / name
        assert not copied.is_symlink() and copied.read_bytes() == source.read_bytes()
        assert oct(copied.stat().st_mode & 0o7777) == oct(expected), name


FLEET_CATALOG = BASE_CATALOG.replace("      - name: MCU\n", "      - name: MCU\n    devices:\n" + "".join(
    f"      - {{name: n-{i:04d}}}\n" for i in range(510)))


async def test_devices_status_plan_validate_against_a_running_server(tmp_path: Path) -> None:
    # The catalog lists 510 devices (known even before they report): `devices` pages twice.
    write_catalog(tmp_path, UPGRADE_BATCH, base=FLEET_CATALOG)
    server = LiveServer(tmp_path)
    config, view = server.config, server.view
    stopped = await asyncio.to_thread(otactl, config, "devices")
    assert stopped.returncode == 1 and "no running server" in stopped.stderr
    await server.start()
    try:
        async with Device(view, "d-1") as d1:
            await d1.inform("1.0.0")
            await d1.next_push()
            async with Device(view, "d-2") as d2:
                await d2.inform("1.1.0")
            await asyncio.sleep(0.3)  # d-2's disconnect reaches the broker
            everyone = await asyncio.to_thread(otactl, config, "devices", "--json")
            assert everyone.returncode == 0, everyone.stderr
            listed = json.loads(everyone.stdout)
            assert listed["total"] == 512 and len({d["device"] for d in listed["devices"]}) == 512
            d_1 = next(d for d in listed["devices"] if d["device"] == "d-1")
            assert d_1["online"] is True and d_1["versions"] == {"default": "1.0.0"} and d_1["last_seen"] > 0
            assert d_1["job"]["batch"] == "up-1.1.0" and d_1["job"]["state"] == "notified"

            async def names(*flags: str) -> list[str]:
                result = await asyncio.to_thread(otactl, config, "devices", "--json", *flags)
                assert result.returncode == 0, result.stderr
                return [d["device"] for d in json.loads(result.stdout)["devices"]]

            assert await names("--online") == ["d-1"]
            assert len(await names("--offline")) == 511
            assert await names("--version", "1.1.0") == ["d-2"]
            assert await names("--state", "notified", "--product", "a1Test") == ["d-1"]
            assert await names("--product", "a1Nope") == []
            table = await asyncio.to_thread(otactl, config, "devices", "--version", "1.0.0")
            header, row = table.stdout.splitlines()
            assert header.split() == ["DEVICE", "PRODUCT", "VERSIONS", "ONLINE", "LAST", "SEEN", "JOB"]
            assert row.startswith("d-1") and " yes " in row and "up-1.1.0 notified 0%" in row
            bad = await asyncio.to_thread(otactl, config, "devices", "--state", "sideways")
            assert bad.returncode == 1 and "not a job state" in bad.stderr
            both = await asyncio.to_thread(otactl, config, "devices", "--online", "--offline")
            assert both.returncode == 1 and "not allowed with" in both.stderr

            status = await asyncio.to_thread(otactl, config, "status", "--json")
            assert status.returncode == 0
            summary = json.loads(status.stdout)["batches"][0]
            assert summary["name"] == "up-1.1.0" and summary["counts"] == {"notified": 1}
            one = await asyncio.to_thread(otactl, config, "status", "up-1.1.0", "--json")
            assert json.loads(one.stdout)["devices"][0]["device"] == "d-1"
            missing = await asyncio.to_thread(otactl, config, "status", "nope")
            assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0

        validate = await asyncio.to_thread(otactl, config, "validate", "--json")
        assert validate.returncode == 0 and json.loads(validate.stdout)["batches"][0]["name"] == "up-1.1.0"
        plan = await asyncio.to_thread(otactl, config, "plan", "--json", "--exit-code")
        assert plan.returncode == 0 and json.loads(plan.stdout)[0]["action"] == "none"
        write_catalog(tmp_path, UPGRADE_BATCH + "- {name: back, package: fw-1.0.0, mode: dynamic}\n",
                      base=FLEET_CATALOG)
        plan = await asyncio.to_thread(otactl, config, "plan", "--json", "--exit-code")
        assert plan.returncode == 2 and [line["action"] for line in json.loads(plan.stdout)] == ["none", "start"]
        write_catalog(tmp_path, UPGRADE_BATCH.replace("mode: dynamic", "mode: sideways"), base=FLEET_CATALOG)
        for command in ("validate", "plan"):
            broken = await asyncio.to_thread(otactl, config, command, "--json")
            assert broken.returncode == 1, broken.stdout
            errors = json.loads(broken.stdout)["errors"]
            assert errors[0]["key"] == "batches[0].mode" and errors[0]["line"] > 0
    finally:
        output = await server.stop()
    assert "Traceback" not in output


def _watch(config: Path, *, terminal: bool, seconds: float = 1.5) -> tuple[int, str]:
    """Run `otactl status --watch 0.2` on a pipe or a terminal, Ctrl-C it after `seconds`."""
    command = [str(BIN / "otactl"), "--config", str(config), "status", "--watch", "0.2"]
    if not terminal:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(seconds)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=10)
        return process.returncode, output
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(command, stdin=secondary, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    chunks, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        if select.select([main], [], [], 0.1)[0]:
            chunks.append(os.read(main, 65536))
    process.send_signal(signal.SIGINT)
    returncode = process.wait(10)
    while select.select([main], [], [], 0.1)[0]:
        try:
            chunks.append(os.read(main, 65536))
        except OSError:
            break
    os.close(main)
    return returncode, b"".join(chunks).decode("utf-8", "replace")


async def test_status_watch_on_a_pipe_and_on_a_terminal(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await LiveServer(tmp_path).start()
    config, view = server.config, server.view
    try:
        async with Device(view, "w-1") as device:
            await device.inform("1.0.0")
            await device.next_push()
            await device.progress(50, "halfway")
        await asyncio.sleep(0.2)
        returncode, output = await asyncio.to_thread(_watch, config, terminal=False)
        assert returncode == 0, output
        assert output.count("-- ") >= 2 and "up-1.1.0" in output and "in_progress 1" in output
        assert "\x1b" not in output and "Traceback" not in output  # plain text on a pipe
        returncode, output = await asyncio.to_thread(_watch, config, terminal=True)
        assert returncode == 0, output
        assert "up-1.1.0" in output and "█" in output and "in_progress 1" in output  # a bar per batch
        assert "Traceback" not in output
    finally:
        await server.stop()


def test_usage_errors_exit_1_not_2(tmp_path: Path) -> None:
    config = demo_catalog(tmp_path)
    for args in (("bogus",), ("status", "--watch", "soon"), ("package",), ("devices", "--limit", "3")):
        result = otactl(config, *args)
        assert result.returncode == 1, (args, result.returncode, result.stderr)
        assert "usage:" in result.stderr
