"""Agent settings: command-line flags, or the environment (``HAPAIR_NODE``, ...)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hapair.shared.etcd_tls import EtcdTlsSettings
from hapair.shared.store import parse_endpoints
from hapair.shared.topology import ACCOUNT_PATTERN, NAME_PATTERN


def default_state_dir() -> Path:
    run = Path("/run/hapair")
    if os.geteuid() == 0 and Path("/run").is_dir():
        return run
    return Path(tempfile.gettempdir()) / f"hapair-{os.geteuid()}"


class AgentSettings(BaseSettings, EtcdTlsSettings):
    model_config = SettingsConfigDict(env_prefix="HAPAIR_", extra="ignore")

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

    @field_validator("etcd")
    @classmethod
    def _etcd(cls, value: str) -> str:
        parse_endpoints(value)
        return value
