"""Registry settings: command line first, then ``HAPAIR_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hapair.registry.auth import parse_tokens, token_file_entries
from hapair.shared.etcd_tls import EtcdTlsSettings
from hapair.shared.network import listen_address
from hapair.shared.store import parse_endpoints


class RegistrySettings(BaseSettings, EtcdTlsSettings):
    model_config = SettingsConfigDict(env_prefix="HAPAIR_", extra="ignore", frozen=True)

    etcd: str = Field(description="etcd endpoints, URL[,URL...]")
    listen: str = Field("0.0.0.0:8700", description="HOST:PORT to serve HTTP on")
    log_level: str = Field("info", pattern=r"^(?i:debug|info|warning|error)$")
    events_keep_days: float = Field(90.0, gt=0, description="age at which events are deleted")
    admin_tokens: str = Field(
        "",
        description="comma-separated NAME:SHA256 (or bare SHA-256) of accepted admin tokens",
    )
    admin_tokens_file: Path | None = Field(
        None, description="a file of NAME:SHA256 lines, the admin bearer tokens accepted"
    )
    open_admin: bool = Field(False, description="admin routes open to anyone (labs)")
    tls_cert: Path | None = Field(None, description="serve HTTPS with this certificate")
    tls_key: Path | None = Field(None, description="the certificate's key (0600)")
    client_ca: Path | None = Field(
        None, description="accept operators' client certificates signed by this CA as admins"
    )
    max_per_client: int = Field(
        50, ge=1, description="event streams and long-polls waiting at once per client address"
    )
    stale_streams_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="seconds out of touch with etcd before the event streams end",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=300, description="seconds a connection has to send a request's headers"
    )

    @field_validator("admin_tokens_file", "tls_cert", "tls_key", "client_ca", mode="before")
    @classmethod
    def _empty(cls, value: object) -> object:
        return None if value == "" else value  # an empty variable: not given

    @field_validator("etcd")
    @classmethod
    def _etcd(cls, value: str) -> str:
        parse_endpoints(value)
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        listen_address(value)
        return value.strip()

    @field_validator("admin_tokens")
    @classmethod
    def _tokens(cls, value: str) -> str:
        parse_tokens(_env_entries(value))
        return value

    @model_validator(mode="after")
    def _together(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("--tls-cert", "--tls-key")[:: 1 if self.tls_key is None else -1]
            raise ValueError(f"{given} given without {missing}: HTTPS needs both")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("--client-ca needs --tls-cert and --tls-key: certificates need HTTPS")
        if self.open_admin and (self.admin_tokens or self.admin_tokens_file or self.client_ca):
            raise ValueError(
                "--open-admin with admin tokens or --client-ca: the admin routes are either "
                "open or need a credential"
            )
        return self

    def admin_tokens_by_digest(self) -> dict[str, str]:
        """{SHA-256 digest: operator name} of every token given, the file read now;
        ValueError naming the entry that is wrong."""
        entries = list(_env_entries(self.admin_tokens))
        if self.admin_tokens_file is not None:
            entries += token_file_entries(self.admin_tokens_file)
        return parse_tokens(entries)

    @property
    def host(self) -> str:
        return listen_address(self.listen)[0]

    @property
    def port(self) -> int:
        return listen_address(self.listen)[1]


def _env_entries(value: str) -> list[tuple[str, str]]:
    return [("HAPAIR_ADMIN_TOKENS", e) for e in value.split(",") if e.strip()]
