"""One device driven by Aliyun's own Python SDK (aliyun-iot-linkkit), to prove the server
works with firmware we did not write. Runs in its own venv (linkkit needs paho-mqtt < 2):

    python3 -m venv /tmp/linkkit-venv
    /tmp/linkkit-venv/bin/pip install aliyun-iot-linkkit==1.2.13 "paho-mqtt<2"
    /tmp/linkkit-venv/bin/python scripts/interop/linkkit_device.py --port 1883 cam-0100

Subscribes to its application topic (user/get) as Aliyun's samples do, reports 1.0.0, waits for the push (linkkit's on_ota_message_arrived), asks again with
query_ota_firmware (get_reply), downloads with linkkit's download_ota_firmware (which checks
the sign), reports progress 100 and the new version. Prints one line; exit 0 on success.
With --cafile it connects over TLS and downloads over https, trusting that CA.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
import tempfile
import threading
import time

from linkkit import linkkit


def serialize_tls_socket() -> None:
    """linkkit 1.2.13 reads its MQTT socket in a thread of its own while its API (publish_topic,
    query_ota_firmware, ...) writes from the caller's thread, and paho 1.6 then writes in place:
    one OpenSSL object used by two threads at once. Over TLS that corrupts a record now and
    then (the server sees a bad record MAC and closes; about 1 run in 5 here). Firmware
    built on linkkit must call its API from one thread; this script, which cannot change
    linkkit, takes one lock around paho's socket reads and writes instead (they do not
    block: paho's socket is non-blocking)."""
    from paho.mqtt import client as paho

    lock = threading.Lock()
    send, recv = paho.Client._sock_send, paho.Client._sock_recv

    def locked_send(self, buf):  # type: ignore[no-untyped-def]
        with lock:
            return send(self, buf)

    def locked_recv(self, size):  # type: ignore[no-untyped-def]
        with lock:
            return recv(self, size)

    paho.Client._sock_send, paho.Client._sock_recv = locked_send, locked_recv


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("device")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--product", default="a1DemoCam")
    parser.add_argument("--product-secret", default="demo-product-secret")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--cafile", help="MQTT over TLS (and https downloads) trusting this CA, as linkkit's "
                                         "config_mqtt(secure='TLS', cadata=...) does")
    parser.add_argument("--clean-session", type=int, choices=(0, 1), default=1,
                        help="linkkit's config_mqtt(clean_session=...): 0 keeps the session, which a broker "
                             "cluster needs to reach a device that never subscribes (docs/cluster.md)")
    args = parser.parse_args()
    secret = hmac.new(args.product_secret.encode(), args.device.encode(), hashlib.sha256).hexdigest()
    kit = linkkit.LinkKit(host_name="cn-shanghai", product_key=args.product, device_name=args.device,
                          device_secret=secret)
    if args.cafile:
        serialize_tls_socket()
        with open(args.cafile, encoding="ascii") as ca:
            kit.config_mqtt(port=args.port, secure="TLS", cadata=ca.read(), endpoint=args.host, keep_alive=60,
                            clean_session=bool(args.clean_session))
    else:
        kit.config_mqtt(port=args.port, secure="", endpoint=args.host, keep_alive=60,
                        clean_session=bool(args.clean_session))
    connected, offers = threading.Event(), []
    offered = threading.Semaphore(0)
    kit.on_connect = lambda session_flag, rc, userdata: rc == 0 and connected.set()

    def on_ota(notice_type, version, size, url, sign_method, sign, module, extra):  # type: ignore[no-untyped-def]
        offers.append({"type": notice_type, "version": version, "url": url, "sign_method": sign_method,
                       "sign": sign})
        offered.release()

    kit.on_ota_message_arrived = on_ota
    kit.connect_async()
    if not connected.wait(10):
        print(f"{args.device} linkkit: not connected")
        return 1
    # As an application does (Aliyun's samples: the product's custom topic user/get). linkkit
    # never subscribes to its OTA topics itself: Aliyun's cloud delivers them regardless; a
    # broker cluster binds them to the session this subscription makes (docs/cluster.md).
    subscribed = threading.Event()
    kit.on_subscribe_topic = lambda mid, granted_qos, userdata: subscribed.set()
    kit.subscribe_topic(kit.to_full_topic("user/get"), 1)
    if not subscribed.wait(10):
        print(f"{args.device} linkkit: subscription not acknowledged")
        return 1
    kit.ota_report_version(None, args.version)  # its return code misreads paho's; the message goes out
    if not offered.acquire(timeout=10):
        print(f"{args.device} linkkit: no push")
        return 1
    kit.query_ota_firmware()
    if not offered.acquire(timeout=10):
        print(f"{args.device} linkkit: no firmware/get reply")
        return 1
    push, reply = offers
    with tempfile.NamedTemporaryFile(suffix=".bin") as image:
        result = kit.download_ota_firmware(reply["url"], image.name, reply["sign_method"], reply["sign"])
    if result != linkkit.LinkKit.ErrorCode.SUCCESS:
        print(f"{args.device} linkkit: download {result}")
        return 1
    progress = f"/ota/device/progress/{args.product}/{args.device}"
    kit.publish_topic(progress, json.dumps({"id": "2", "params": {"step": "100", "desc": "installed"}}))
    time.sleep(0.3)
    kit.ota_report_version(None, push["version"])
    time.sleep(0.5)
    kit.disconnect()
    print(f"{args.device} linkkit: {args.version} -> {push['version']} ok (push type {push['type']}, "
          f"get_reply type {reply['type']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
