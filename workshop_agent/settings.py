"""Agent settings: command-line flags, or the environment (``HAPAIR_NODE``, ...).

Read with a plain model and a few lines rather than pydantic-settings, which would cost
the agent about 5 MiB of memory for as much."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from hapair.shared.etcd_tls import EtcdTlsSettings
from hapair.shared.store import parse_endpoints
from hapair.shared.topology import ACCOUNT_PATTERN, NAME_PATTERN
from hapair.workshop_agent import priority


def default_state_dir() -> Path:
    run = Path("/run/hapair")
    if os.geteuid() == 0 and Path("/run").is_dir():
        return run
    return Path(tempfile.gettempdir()) / f"hapair-{os.geteuid()}"


ENV_PREFIX = "HAPAIR_"


class AgentSettings(EtcdTlsSettings):
    """Each setting given, else ``HAPAIR_{NAME}`` from the environment, else its default."""

    model_config = ConfigDict(extra="ignore")

    node: str = Field(pattern=NAME_PATTERN, description="this server's node name")
    etcd: str = Field("http://127.0.0.1:2379", description="etcd URLs, comma-separated")
    state_dir: Path = Field(default_factory=default_state_dir)
    log_level: str = "info"
    etcd_timeout_s: float = Field(0.5, gt=0.0, le=5.0)
    # Whom services run as is this server's own decision: these come from its command
    # line or environment only, never from the site file in etcd.
    service_user: str | None = Field(
        None, pattern=ACCOUNT_PATTERN, description="user of a service that names none"
    )
    service_group: str | None = Field(
        None, pattern=ACCOUNT_PATTERN, description="group of a service that names none"
    )
    allow_root_services: bool = Field(False, description="may a service run as root here")
    realtime_priority: int = Field(
        priority.DEFAULT,
        ge=0,
        le=98,
        description="SCHED_RR priority of the agent, its watchdog's one above (0: the "
        "ordinary scheduling, which a busy server may delay into a fence)",
    )
    package_ca: Path | None = Field(
        None,
        description="the CA of the https:// servers packages come from; default: the etcd "
        "CA (the site CA), or the system's CAs without one",
    )

    @model_validator(mode="before")
    @classmethod
    def _environment(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = dict(data)
        for name in cls.model_fields:
            value = os.environ.get(ENV_PREFIX + name.upper())
            if name not in given and value is not None:
                given[name] = value
        return given

    @field_validator("package_ca")
    @classmethod
    def _package_ca(cls, value: Path | None) -> Path | None:
        if value is not None:
            ca_context(value)  # read and checked at start, not at the first download
        return value

    @property
    def package_ssl(self) -> ssl.SSLContext | None:
        """How package servers' certificates are checked; None: the system's CAs."""
        ca = self.package_ca or self.etcd_ca
        return None if ca is None else ca_context(ca)

    @field_validator("etcd")
    @classmethod
    def _etcd(cls, value: str) -> str:
        parse_endpoints(value)
        return value


def ca_context(ca: Path) -> ssl.SSLContext:
    """A client's context trusting ``ca`` alone, names checked; ValueError naming the
    file when it is not a CA certificate."""
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"{ca}: cannot be read as a CA certificate ({err})") from None
