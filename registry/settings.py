"""Registry settings: command line first, then ``HAPAIR_*`` environment variables."""

from __future__ import annotations

import re

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hapair.shared.etcd_tls import EtcdTlsSettings
from hapair.shared.store import parse_endpoints


class RegistrySettings(BaseSettings, EtcdTlsSettings):
    model_config = SettingsConfigDict(env_prefix="HAPAIR_", extra="ignore", frozen=True)

    etcd: str = Field(description="etcd endpoints, URL[,URL...]")
    listen: str = Field("0.0.0.0:8700", description="HOST:PORT to serve HTTP on")
    log_level: str = Field("info", pattern=r"^(?i:debug|info|warning|error)$")
    events_keep_days: float = Field(90.0, gt=0, description="age at which events are deleted")
    admin_tokens: str = Field(
        "", description="comma-separated SHA-256 hex digests of accepted admin bearer tokens"
    )

    @field_validator("etcd")
    @classmethod
    def _etcd(cls, value: str) -> str:
        parse_endpoints(value)
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        match = re.fullmatch(r"\[?([^\[\]]*)\]?:(\d{1,5})", value.strip())
        if match is None or not 0 <= int(match.group(2)) <= 65535:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value.strip()

    @field_validator("admin_tokens")
    @classmethod
    def _tokens(cls, value: str) -> str:
        for digest in filter(None, (d.strip() for d in value.split(","))):
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError("each admin token must be given as a SHA-256 hex digest")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def token_hashes(self) -> frozenset[str]:
        return frozenset(d.strip() for d in self.admin_tokens.split(",") if d.strip())
