"""The gateway's one configuration file (``/etc/clinic-gateway/config.toml``), validated at start.

Built like the device's (device_agent/config.py): every error names the field
(``broker.port``) and what was expected, and unknown keys are errors, so a misspelt
``insecure_dev_mode`` can never be silently ignored. Secure by default: TLS to the broker,
sealing keys and a signing key are required unless ``insecure_dev_mode = true`` says this is
a developer's bench. ``clinic_gateway/config.example.toml`` documents every key.

Worker ``n`` (1..workers) gets its own TLS identity: the shipped broker makes the client id
the certificate's CN, so two workers under one certificate would keep evicting each other.
``broker.cert_file`` and ``broker.key_file`` hold ``{n}`` when ``workers > 1``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from dermascope_wire import seal
from dermascope_wire.signing import load_private_key as load_signing_key
from dermascope_wire.validation import (
    ConfigError,
    loads,
    mutual_tls_missing,
    one_or_more,
    read_toml,
    validated,
)

DEFAULT_CONFIG_PATH = Path("/etc/clinic-gateway/config.toml")
WORKER_PLACEHOLDER = "{n}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Port = Annotated[int, Field(ge=1, le=65535)]


class BrokerConfig(_Section):
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Port = 8883
    protocol: Literal["mqtt5", "mqtt311"] = "mqtt5"
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")] = "derm/v1"
    # The MQTT 5 shared subscription's group: every worker of every gateway host in it shares
    # the uploads (docs/scaling.md).
    group: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "gateways"
    # Mutual TLS: the clinic CA and this worker's certificate and key ({n}: worker number).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # The connection that sends commands (CN "commander"); default: the worker's own.
    command_cert_file: Path | None = None
    command_key_file: Path | None = None

    @property
    def tls(self) -> bool:
        return self.ca_file is not None


class StoreConfig(_Section):
    dir: Path = Path("/var/lib/clinic-gateway/store")
    # A transfer bigger than this is refused at its manifest (reason "too_large").
    max_size_mb: Annotated[float, Field(gt=0, le=4096)] = 512.0
    # A staged transfer nobody touched for this long is removed (the device starts it over).
    staging_ttl_days: Annotated[float, Field(gt=0, le=365)] = 14.0
    # Also write <capture>.dcm next to each stored image.
    export_dicom: bool = True


class KeysConfig(_Section):
    # The clinic's X25519 private keys (PEM) that open sealed captures: during a rotation the
    # new and the old one (docs/security.md).
    sealing: list[Path] = []
    # The clinic's Ed25519 private key (PEM) that signs every ack and command.
    signing: Path | None = None

    _listed = field_validator("sealing", mode="before")(one_or_more)

    # Read now: a wrong path stops the start with the field named, not the first capture.
    _sealing_keys_load = field_validator("sealing")(loads(seal.load_private_key))
    _signing_key_loads = field_validator("signing")(loads(load_signing_key))


class ServiceConfig(_Section):
    # Worker processes on the shared subscription and the shared store; the supervisor
    # restarts one that dies.
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # JSON log events also go to this file (they always go to standard output: journald).
    log_file: Path | None = None
    # A developer's bench only: no TLS, no keys, unsealed captures stored, acks unsigned.
    insecure_dev_mode: bool = False


class MetricsConfig(_Section):
    # The Prometheus endpoint (/metrics) of the supervisor, for every worker together.
    enabled: bool = True
    address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9464


class WebConfig(_Section):
    # The GP's page and the JSON API (clinic_gateway/web, docs/gateway.md), a process of
    # its own that the supervisor starts and restarts.
    enabled: bool = False
    address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # HTTPS: the server's certificate (chain) and key, PEM; both or neither. Without them
    # the page is plain HTTP: keep the address on loopback behind a TLS proxy then.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Staff who may sign in: user name -> scrypt hash (clinic-gateway hash-password).
    users: dict[str, str] = {}
    # The clinic's systems (the EHR) that call the API with "Authorization: Bearer <token>":
    # client name -> token hash (clinic-gateway hash-password --new-api-token).
    api_tokens: dict[str, str] = {}
    # A session ends after this many minutes without a request.
    session_idle_minutes: Annotated[float, Field(gt=0, le=24 * 60)] = 60.0
    # How long a device has to answer open_case / close_case.
    command_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    # The connection that watches the devices' status (online, outbox, calibration) needs its
    # own certificate (CN "monitor") with the broker's TLS: the broker makes the client id
    # the CN, so sharing the commander's would evict it.
    status_cert_file: Path | None = None
    status_key_file: Path | None = None

    @field_validator("users")
    @classmethod
    def _users_valid(cls, users: dict[str, str]) -> dict[str, str]:
        from clinic_gateway.web.auth import USER_NAME, parse_hash

        for name, stored in users.items():
            if not USER_NAME.match(name):
                raise ValueError(f"user {name!r}: 1-64 letters, digits or . _ @ -")
            try:
                parse_hash(stored)
            except ValueError as err:
                raise ValueError(f"user {name!r}: {err}") from None
        return users

    @field_validator("api_tokens")
    @classmethod
    def _tokens_valid(cls, tokens: dict[str, str]) -> dict[str, str]:
        from clinic_gateway.web.auth import USER_NAME, check_token_hash

        for name, stored in tokens.items():
            if not USER_NAME.match(name):
                raise ValueError(f"API client {name!r}: 1-64 letters, digits or . _ @ -")
            try:
                check_token_hash(stored)
            except ValueError as err:
                raise ValueError(f"API client {name!r}: {err}") from None
        return tokens

    @model_validator(mode="after")
    def _usable(self) -> WebConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if (self.status_cert_file is None) != (self.status_key_file is None):
            raise ValueError("status_cert_file and status_key_file go together")
        if self.enabled and not self.users and not self.api_tokens:
            raise ValueError("enabled, but no users and no api_tokens: nobody could sign in")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


AeTitle = Annotated[str, Field(pattern=r"^[ -\[\]-~]{1,16}$")]  # 16 chars, no backslash


class PacsConfig(_Section):
    # Forward every stored capture's DICOM object to the clinic's PACS (docs/gateway.md, PACS).
    enabled: bool = False
    # "stow-rs" (DICOMweb, over HTTP(S)) or "c-store" (DIMSE, the classic DICOM network).
    transport: Literal["stow-rs", "c-store"] = "stow-rs"
    # STOW-RS: the DICOMweb root (instances go to <url>/studies).
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")] | None = None
    # HTTP basic authentication: the password is read from a file (0600), never the config.
    username: str | None = None
    password_file: Path | None = None
    # C-STORE: the PACS's address and AE title, and ours.
    host: str | None = None
    port: Port = 104
    called_ae_title: AeTitle = "PACS"
    calling_ae_title: AeTitle = "DERMGW"
    # TLS: the CA that signed the PACS's certificate (https, or DICOM TLS for C-STORE; for
    # https the system's CAs when left out), and our client certificate if the PACS asks.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Seconds one send may take (connect, answer) before it counts as a failed try.
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    # After a failed try the next waits retry_initial_s, doubling up to retry_max_s.
    retry_initial_s: Annotated[float, Field(gt=0, le=3600)] = 2.0
    retry_max_s: Annotated[float, Field(gt=0, le=86400)] = 300.0
    # How often an idle forwarder looks for new entries in the queue.
    poll_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0

    @field_validator("password_file", "ca_file", "cert_file", "key_file")
    @classmethod
    def _file_reads(cls, value: Path | None) -> Path | None:
        # Read now: a wrong path stops the start with the field named, not the first send.
        if value is not None:
            try:
                value.read_text("utf-8")  # the password, or PEM
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"{value} is not a readable text file "
                                 f"({getattr(err, 'strerror', None) or err})") from None
        return value

    @model_validator(mode="after")
    def _complete(self) -> PacsConfig:
        if self.enabled and self.transport == "stow-rs" and self.url is None:
            raise ValueError("pacs.url: transport \"stow-rs\" needs the PACS's DICOMweb URL, "
                             "e.g. https://pacs.clinic.example/dicom-web")
        if self.enabled and self.transport == "c-store" and not self.host:
            raise ValueError("pacs.host: transport \"c-store\" needs the PACS's host name")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("pacs: username and password_file go together")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("pacs: cert_file and key_file go together")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("pacs.retry_max_s: smaller than pacs.retry_initial_s")
        return self

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return self.password_file.read_text("utf-8").strip()


class Config(_Section):
    broker: BrokerConfig = BrokerConfig()
    store: StoreConfig = StoreConfig()
    keys: KeysConfig = KeysConfig()
    service: ServiceConfig = ServiceConfig()
    metrics: MetricsConfig = MetricsConfig()
    web: WebConfig = WebConfig()
    pacs: PacsConfig = PacsConfig()

    @model_validator(mode="after")
    def _web_watches_with_its_own_certificate(self) -> Config:
        w = self.web
        if w.enabled and self.broker.tls and w.status_cert_file is None:
            raise ValueError("web.status_cert_file: with the broker's TLS the GP's page needs "
                             "its own certificate (CN \"monitor\") and key to watch the "
                             "devices' status")
        if w.status_cert_file is not None and not self.broker.tls:
            raise ValueError("web.status_cert_file: needs the broker's TLS (broker.ca_file)")
        return self

    def status_tls(self) -> dict[str, str] | None:
        """paho ``tls_set`` arguments of the web process's status connection."""
        w = self.web
        if not self.broker.tls or w.status_cert_file is None:
            return None
        return {"ca_certs": str(self.broker.ca_file), "certfile": str(w.status_cert_file),
                "keyfile": str(w.status_key_file)}

    @model_validator(mode="after")
    def _pacs_needs_dicom(self) -> Config:
        if self.pacs.enabled and not self.store.export_dicom:
            raise ValueError("pacs.enabled: the PACS gets the DICOM export; set "
                             "store.export_dicom = true")
        return self

    @model_validator(mode="after")
    def _tls_or_declared_insecure(self) -> Config:
        b = self.broker
        missing = mutual_tls_missing("broker", {"ca_file": b.ca_file, "cert_file": b.cert_file,
                                                "key_file": b.key_file})
        if missing and not self.service.insecure_dev_mode:
            raise ValueError("broker.ca_file: no TLS configured; set broker.ca_file, "
                             "cert_file and key_file, or service.insecure_dev_mode = true on a "
                             "developer's bench only")
        if (b.command_cert_file is None) != (b.command_key_file is None):
            raise ValueError("broker: command_cert_file and command_key_file go together")
        if b.command_cert_file is not None and not b.tls:
            raise ValueError("broker.command_cert_file: needs the broker's TLS (ca_file)")
        if b.tls and self.service.workers > 1:
            for name in ("cert_file", "key_file"):
                if WORKER_PLACEHOLDER not in str(getattr(b, name)):
                    raise ValueError(
                        f"broker.{name}: with service.workers = {self.service.workers} each "
                        f"worker needs its own certificate (the broker makes the client id "
                        f"the CN): put {WORKER_PLACEHOLDER} in the path, e.g. gateway-{{n}}.crt")
        return self

    @model_validator(mode="after")
    def _keys_or_declared_insecure(self) -> Config:
        if self.service.insecure_dev_mode:
            return self
        if not self.keys.sealing:
            raise ValueError("keys.sealing: no clinic private key; sealed captures could not be "
                             "opened (set service.insecure_dev_mode = true on a bench only)")
        if self.keys.signing is None:
            raise ValueError("keys.signing: no signing key; acks would go unsigned and "
                             "provisioned devices refuse them (set service.insecure_dev_mode "
                             "= true on a bench only)")
        return self

    def worker_tls(self, n: int) -> dict[str, str] | None:
        """paho ``tls_set`` arguments of worker ``n`` (1-based), or None without TLS."""
        b = self.broker
        if not b.tls:
            return None
        return {"ca_certs": str(b.ca_file), "certfile": worker_path(b.cert_file, n),
                "keyfile": worker_path(b.key_file, n)}

    def command_tls(self, n: int) -> dict[str, str] | None:
        b = self.broker
        if b.command_cert_file is None or b.command_key_file is None:
            return self.worker_tls(n)
        return {"ca_certs": str(b.ca_file), "certfile": str(b.command_cert_file),
                "keyfile": str(b.command_key_file)}


def worker_path(path: Path | None, n: int) -> str:
    return str(path).replace(WORKER_PLACEHOLDER, str(n))


def parse_config(data: dict, source: str = "<config>") -> Config:
    return validated(Config, data, source)


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file; raise ConfigError naming the bad field."""
    return parse_config(read_toml(path), str(path))


def check_tls_files(config: Config) -> None:
    """Load the CA and every worker's (the commander's, the web page's) certificate and key;
    ConfigError naming the field otherwise. Not part of parsing, so ``check`` can report it
    as its own line; ``run`` calls it as it starts."""
    w = config.web
    if w.tls_cert_file is not None:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            server.load_cert_chain(str(w.tls_cert_file), str(w.tls_key_file), password="")
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"web.tls_cert_file, web.tls_key_file: {w.tls_cert_file} and "
                              f"{w.tls_key_file} are not a readable PEM certificate and its "
                              f"unencrypted private key "
                              f"({getattr(err, 'strerror', None) or err})") from None
    b = config.broker
    if not b.tls:
        return
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=str(b.ca_file))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"broker.ca_file: {b.ca_file} is not a readable PEM certificate "
                          f"({getattr(err, 'strerror', None) or err})") from None
    pairs = [(("broker.cert_file", "broker.key_file"), worker_path(b.cert_file, n),
              worker_path(b.key_file, n)) for n in range(1, config.service.workers + 1)]
    if b.command_cert_file is not None:
        pairs.append((("broker.command_cert_file", "broker.command_key_file"),
                      str(b.command_cert_file), str(b.command_key_file)))
    if w.status_cert_file is not None:
        pairs.append((("web.status_cert_file", "web.status_key_file"), str(w.status_cert_file),
                      str(w.status_key_file)))
    for (cert_name, key_name), cert, key in pairs:
        try:
            # An empty password: an encrypted key fails here instead of prompting.
            context.load_cert_chain(cert, key, password="")
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"{cert_name}, {key_name}: {cert} and {key} are not "
                              f"a readable PEM certificate and its unencrypted private key "
                              f"({getattr(err, 'strerror', None) or err})") from None
