"""The OTA plugin's settings from broker.yaml (docs/configuration.md), validated, with paths resolved."""
from __future__ import annotations

import resource
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from otacore.config.accel import AccelSettings, accel_settings
from otacore.errors import ConfigError, ConfigIssue

DEFAULT_EXTENSIONS = (".bin", ".dav", ".tar", ".gz", ".zip", ".gzip", ".apk", ".tar.gz", ".tar.xz", ".pack")
PLUGIN_PATH = "broker_plugin.ota.OtaPlugin"
# Download URLs start with it, inside every push: bounded so a push fits a device's buffer.
MAX_PUBLIC_URL = 1000

# Limits on what a client can make the server hold: (key under `limits`, default, smallest
# allowed, what it bounds). docs/operations.md "Limits" explains each.
NETWORK_LIMITS: tuple[tuple[str, float, float, str], ...] = (
    ("connect_timeout_seconds", 10, 1, "seconds from an MQTT connection's accept to its CONNECT"),
    ("header_timeout_seconds", 10, 1, "seconds an HTTP connection has to send a request's headers"),
    ("max_unauthenticated", 5000, 10, "connections not yet authenticated; past it the oldest is dropped"),
    ("max_connections_per_device", 4, 1, "MQTT connections one device's credentials hold; past it the oldest closes"),
    ("max_subscriptions", 100, 1, "subscription filters per MQTT client"),
    ("max_retained_kb", 64, 0, "retained message bytes per device (never on OTA topics)"),
    ("session_expiry_hours", 24, 0, "hours a disconnected clean_session=0 session is kept"),
    ("max_unsent_kb", 1024, 64, "bytes unsent to a connection before it counts as not reading"),
    ("max_packet_kb", 256, 72, "largest MQTT packet a client may send (OTA payloads are at most 64 KiB)"),
    ("log_field_max", 200, 16, "characters of a client-sent value in a log line"),
)

_KNOWN = {
    "catalog": None, "data_dir": None, "url_ttl_seconds": None, "retention_days": None,
    "http": {"bind", "public_url", "tls", "accel"},
    "limits": {"max_file_mb", "extensions", *(name for name, *_ in NETWORK_LIMITS)},
    "auth": {"allow_plain_secret"},
    "admin": {"token"},
    "metrics": {"public"},
    "tls": {"compatibility", "min_version", "ciphers"},
    "cluster": {"amqp", "vhost", "partitions", "queue_type", "auth_token", "postgres", "advertise"},
}
# Cluster mode (docs/cluster.md): device partitions, fixed for the life of the cluster's queues.
MAX_PARTITIONS = 1024
QUEUE_TYPES = ("classic", "quorum")
# How both TLS endpoints negotiate (otaserver/tls.py builds the contexts).
TLS_LEVELS = ("iot", "intermediate", "modern")
TLS_MIN_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True)
class Settings:
    catalog_path: Path
    data_dir: Path
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    public_url: str = "http://localhost:8080"
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # HTTPS on its own address beside plain HTTP; without it, http.bind itself speaks TLS.
    tls_host: str | None = None
    tls_port: int | None = None
    tls_public_url: str | None = None
    url_ttl_seconds: int = 86400
    max_file_mb: int = 1000
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    allow_plain_secret: bool = True
    admin_token: str | None = None
    source: Path = field(default=Path("broker.yaml"))
    connect_timeout_seconds: float = 10
    header_timeout_seconds: float = 10
    max_unauthenticated: int = 5000
    max_connections_per_device: int = 4
    max_subscriptions: int = 100
    max_retained_kb: int = 64
    session_expiry_hours: float = 24
    max_unsent_kb: int = 1024
    max_packet_kb: int = 256
    log_field_max: int = 200
    metrics_public: bool = False  # GET /metrics without the admin token
    tls_compatibility: str = "iot"
    tls_min_version: str = "1.2"
    tls_ciphers: str | None = None  # OpenSSL list for TLS 1.2, replacing the level's
    retention_days: float | None = None  # finished history of removed batches kept this long; None: for ever
    accel: AccelSettings | None = None  # http.accel: nginx serves authorized downloads (X-Accel-Redirect)
    # Cluster mode: no embedded broker; a worker on these RabbitMQ nodes (tried in order).
    cluster_amqp: tuple[str, ...] = ()
    cluster_vhost: str = "/"  # the devices' vhost, the one the auth endpoints allow
    cluster_partitions: int = 8
    cluster_queue_type: str = "classic"
    cluster_auth_token: str | None = None  # the login endpoints live under /broker-auth/{token}/
    # Several workers: the shared journal (PostgreSQL DSN) and how the others reach this one's HTTP.
    cluster_postgres: str | None = None
    cluster_advertise: str | None = None

    @property
    def tls_enabled(self) -> bool:
        return self.tls_certfile is not None

    def base_url(self, protocol: str) -> str:
        """Base of download URLs for a batch protocol (`http` or `https`)."""
        if protocol != "https":
            return self.public_url
        if self.tls_public_url:
            return self.tls_public_url
        host = urlsplit(self.public_url).hostname or "localhost"
        if self.tls_port is not None:  # HTTPS on its own port: same host, that port
            return f"https://{f'[{host}]' if ':' in host else host}:{self.tls_port}"
        return "https://" + self.public_url.split("://", 1)[1]

    @property
    def cluster_mode(self) -> bool:
        """A worker on a RabbitMQ cluster, not a broker of its own."""
        return bool(self.cluster_amqp)

    @property
    def plain_http(self) -> bool:
        """Does the file server speak plain HTTP anywhere (for `http` batches)?"""
        return self.tls_certfile is None or self.tls_port is not None

    @property
    def unauthenticated_cap(self) -> int:
        """limits.max_unauthenticated, but at most a quarter of the open-files limit per
        protocol: a cap above the descriptors there are never drops anyone, and sockets
        held open would stop the listeners instead (1,000 with the common limit of 1,024)."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return self.max_unauthenticated
        return min(self.max_unauthenticated, max(10, soft // 4))

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_mb * 1024 * 1024


def split_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[v6]:PORT` -> (host, port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def default_data_dir(config_dir: Path) -> Path:
    """`var/` at the repo root when running from a checkout, else `var/` beside broker.yaml."""
    root = Path(__file__).resolve().parents[1]
    return (root if (root / "pyproject.toml").is_file() else config_dir.resolve()) / "var"


def settings_from_mapping(options: dict[str, Any] | None, source: Path, lines: Any = None) -> Settings:
    """Build Settings from the OTA plugin's option mapping in broker.yaml at `source`.

    Relative paths resolve against broker.yaml's folder; `data_dir` defaults to `var/` at
    the repo root, the catalog to `ota.yaml` beside broker.yaml.
    """
    options = dict(options or {})
    base = source.parent
    issues: list[ConfigIssue] = []

    def line_of(key: str) -> int:
        return lines.line_of(key) if lines is not None and hasattr(lines, "line_of") else 0

    def bad(key: str, message: str) -> None:
        top = key.split(".")[0]
        issues.append(ConfigIssue(source, line_of(top), f"{PLUGIN_PATH}.{key}", message))

    for key, value in options.items():
        if key not in _KNOWN:
            bad(key, f"unknown key; known keys are {', '.join(sorted(_KNOWN))}")
        elif _KNOWN[key] is not None:
            if not isinstance(value, dict):
                bad(key, "must be a mapping")
                continue
            for sub in value:
                if sub not in _KNOWN[key]:
                    bad(f"{key}.{sub}", f"unknown key; known keys are {', '.join(sorted(_KNOWN[key]))}")

    def sub(section: str, key: str, default: Any) -> Any:
        value = options.get(section)
        return value.get(key, default) if isinstance(value, dict) else default

    def path(value: Any, key: str, default: Path) -> Path:
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            bad(key, "must be a path string")
            return default
        return (base / value).resolve()

    catalog = path(options.get("catalog"), "catalog", base / "ota.yaml")
    data_dir = path(options.get("data_dir"), "data_dir", default_data_dir(base))

    http_host, http_port = "0.0.0.0", 8080
    bind = sub("http", "bind", None)
    if bind is not None:
        try:
            http_host, http_port = split_host_port(str(bind))
        except ValueError as exc:
            bad("http.bind", str(exc))
    public_url = sub("http", "public_url", "http://localhost:8080")
    if not isinstance(public_url, str) or urlsplit(public_url).scheme not in ("http", "https") \
            or not urlsplit(public_url).netloc or len(public_url) > MAX_PUBLIC_URL:
        bad("http.public_url", f"{public_url!r} is not an absolute http(s) URL like http://host:8080 of at most "
                               f"{MAX_PUBLIC_URL} characters")
        public_url = "http://localhost:8080"

    certfile = keyfile = tls_host = tls_port = tls_public_url = None
    tls = sub("http", "tls", None)
    if tls is not None:
        if not isinstance(tls, dict) or not tls.get("certfile") or not tls.get("keyfile"):
            bad("http.tls", "needs both certfile and keyfile (scripts/dev-cert makes a pair)")
        else:
            for extra in set(tls) - {"certfile", "keyfile", "bind", "public_url"}:
                bad(f"http.tls.{extra}", "unknown key; known keys are bind, certfile, keyfile, public_url")
            if tls.get("bind") is not None:
                try:
                    tls_host, tls_port = split_host_port(str(tls["bind"]))
                except ValueError as exc:
                    bad("http.tls.bind", str(exc))
            tls_public_url = tls.get("public_url")
            if tls_public_url is not None and (not isinstance(tls_public_url, str)
                                               or not tls_public_url.startswith("https://")
                                               or len(tls_public_url) > MAX_PUBLIC_URL):
                bad("http.tls.public_url", f"{tls_public_url!r} is not an https:// URL of at most "
                                           f"{MAX_PUBLIC_URL} characters")
                tls_public_url = None
            certfile = path(tls["certfile"], "http.tls.certfile", base)
            keyfile = path(tls["keyfile"], "http.tls.keyfile", base)
            for name, file in (("certfile", certfile), ("keyfile", keyfile)):
                if not file.is_file():
                    bad(f"http.tls.{name}", f"{file} does not exist")

    accel = accel_settings(sub("http", "accel", None), bad, split_host_port)

    ttl = options.get("url_ttl_seconds", 86400)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 60:
        bad("url_ttl_seconds", "must be a whole number of seconds, at least 60")
        ttl = 86400
    max_mb = sub("limits", "max_file_mb", 1000)
    if not isinstance(max_mb, int) or isinstance(max_mb, bool) or max_mb < 1:
        bad("limits.max_file_mb", "must be a whole number of MB, at least 1")
        max_mb = 1000
    extensions = sub("limits", "extensions", None)
    if extensions is None:
        ext_tuple = DEFAULT_EXTENSIONS
    elif isinstance(extensions, str):
        ext_tuple = tuple(e.lower() for e in extensions.split())
    elif isinstance(extensions, list) and all(isinstance(e, str) for e in extensions):
        ext_tuple = tuple(e.lower() for e in extensions)
    else:
        bad("limits.extensions", "must be a list of endings like [.bin, .tar.gz]")
        ext_tuple = DEFAULT_EXTENSIONS
    if any(not e.startswith(".") for e in ext_tuple):
        bad("limits.extensions", "each ending starts with a dot, like .bin")
    network_limits: dict[str, float] = {}
    for name, default, smallest, _ in NETWORK_LIMITS:
        value = sub("limits", name, default)
        whole = isinstance(default, int) and not name.endswith(("_seconds", "_hours"))
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value < smallest:
            kind = "a whole number" if whole else "a number"
            bad(f"limits.{name}", f"must be {kind}, at least {smallest:g} (default {default:g})")
            value = default
        network_limits[name] = value
    allow_plain = sub("auth", "allow_plain_secret", True)
    if not isinstance(allow_plain, bool):
        bad("auth.allow_plain_secret", "must be true or false")
        allow_plain = True
    token = sub("admin", "token", None)
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        bad("admin.token", "must be a string of at least 16 characters (or leave it out to generate one)")
        token = None
    metrics_public = sub("metrics", "public", False)
    if not isinstance(metrics_public, bool):
        bad("metrics.public", "must be true or false")
        metrics_public = False

    tls_compatibility, tls_min_version, tls_ciphers = _tls_policy(options.get("tls"), bad)
    retention_days = options.get("retention_days")
    if retention_days is not None and (isinstance(retention_days, bool) or not isinstance(retention_days, (int, float))
                                       or not 1 <= retention_days <= 36500):
        bad("retention_days", f"{retention_days!r} is not a number of days from 1 to 36500 (or leave it out to keep "
                              "history for ever)")
        retention_days = None

    cluster = _cluster(options.get("cluster"), bad)

    if issues:
        raise ConfigError(issues)
    return Settings(
        catalog_path=catalog, data_dir=data_dir, http_host=http_host, http_port=http_port,
        public_url=public_url.rstrip("/"), tls_certfile=certfile, tls_keyfile=keyfile,
        tls_host=tls_host, tls_port=tls_port, tls_public_url=tls_public_url.rstrip("/") if tls_public_url else None,
        url_ttl_seconds=ttl, max_file_mb=max_mb, extensions=ext_tuple,
        allow_plain_secret=allow_plain, admin_token=token, source=source, metrics_public=metrics_public,
        tls_compatibility=tls_compatibility, tls_min_version=tls_min_version, tls_ciphers=tls_ciphers,
        retention_days=retention_days, accel=accel, cluster_amqp=cluster[0], cluster_vhost=cluster[1],
        cluster_partitions=cluster[2], cluster_queue_type=cluster[3], cluster_auth_token=cluster[4],
        cluster_postgres=cluster[5], cluster_advertise=cluster[6],
        **network_limits,
    )


def _cluster(cluster: Any, bad: Any) -> tuple[tuple[str, ...], str, int, str, str | None, str | None, str | None]:
    """(amqp URLs, vhost, partitions, queue type, auth token, postgres DSN, advertised HTTP URL)
    of the `cluster` mapping; no URLs: embedded."""
    if not isinstance(cluster, dict):
        return (), "/", 8, "classic", None, None, None
    amqp = cluster.get("amqp")
    if isinstance(amqp, str):
        amqp = [amqp]
    urls: tuple[str, ...] = ()
    if not isinstance(amqp, list) or not amqp or not all(isinstance(url, str) for url in amqp) \
            or any(urlsplit(url).scheme not in ("amqp", "amqps") or not urlsplit(url).hostname for url in amqp):
        bad("cluster.amqp", "must list the RabbitMQ nodes' AMQP URLs, like [amqp://ota-worker:PASSWORD@host1:5672/]")
    else:
        urls = tuple(amqp)
    vhost = cluster.get("vhost", "/")
    if not isinstance(vhost, str) or not vhost:
        bad("cluster.vhost", "must be the devices' RabbitMQ vhost, like /")
        vhost = "/"
    partitions = cluster.get("partitions", 8)
    if isinstance(partitions, bool) or not isinstance(partitions, int) or not 1 <= partitions <= MAX_PARTITIONS:
        bad("cluster.partitions", f"must be a whole number from 1 to {MAX_PARTITIONS} (default 8); it is fixed "
                                  "once the cluster's queues exist")
        partitions = 8
    queue_type = cluster.get("queue_type", "classic")
    if queue_type not in QUEUE_TYPES:
        bad("cluster.queue_type", f"must be one of {', '.join(QUEUE_TYPES)} (quorum on three nodes or more)")
        queue_type = "classic"
    token = cluster.get("auth_token")
    if token is not None and (not isinstance(token, str) or len(token) < 16
                              or not all(c.isalnum() or c in "-_" for c in token)):
        bad("cluster.auth_token", "must be at least 16 letters, digits, - or _ (it goes in RabbitMQ's auth_http "
                                  "URLs: /broker-auth/TOKEN/user)")
        token = None
    postgres = cluster.get("postgres")
    if postgres is not None and (not isinstance(postgres, str)
                                 or urlsplit(postgres).scheme not in ("postgresql", "postgres")):
        bad("cluster.postgres", "must be a PostgreSQL URL, like postgresql://ota@db1:5432/ota (the workers' shared "
                                "journal)")
        postgres = None
    advertise = cluster.get("advertise")
    if advertise is not None and (not isinstance(advertise, str) or urlsplit(advertise).scheme not in ("http", "https")
                                  or not urlsplit(advertise).hostname):
        bad("cluster.advertise", "must be the URL other workers reach this worker's http.bind at, like "
                                 "http://10.0.0.5:8080")
        advertise = None
    return urls, vhost, partitions, queue_type, token, postgres, advertise


def _tls_policy(tls: Any, bad: Any) -> tuple[str, str, str | None]:
    """(compatibility, min_version, ciphers) of the `tls` mapping; a cipher list OpenSSL
    cannot use is refused here, at start, not at the first handshake."""
    tls = tls if isinstance(tls, dict) else {}
    level = tls.get("compatibility", "iot")
    if level not in TLS_LEVELS:
        bad("tls.compatibility", f"{level!r} is not a level; use one of {', '.join(TLS_LEVELS)} (default iot)")
        level = "iot"
    minimum = tls.get("min_version", "1.2")
    minimum = f"{minimum:.1f}" if isinstance(minimum, float) else minimum  # YAML reads 1.2 as a number
    if minimum not in TLS_MIN_VERSIONS:
        bad("tls.min_version", f"{minimum!r} is not a TLS version this server speaks; use \"1.2\" or \"1.3\"")
        minimum = "1.2"
    ciphers = tls.get("ciphers")
    if ciphers is not None:
        if not isinstance(ciphers, str) or not ciphers.strip() or len(ciphers) > 2000:
            bad("tls.ciphers", "must be an OpenSSL cipher list such as ECDHE+AESGCM:AES128-SHA256")
            ciphers = None
        else:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
            except ssl.SSLError:
                bad("tls.ciphers", f"OpenSSL selects no cipher from {ciphers!r}; write a list such as "
                                   "ECDHE+AESGCM:AES128-SHA256 (`openssl ciphers -v LIST` shows what it selects)")
                ciphers = None
    return level, minimum, ciphers
