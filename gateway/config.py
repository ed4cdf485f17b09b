"""Settings: `config/gateway.toml` defaults overridden by environment variables.

A missing or malformed setting stops the start with one line naming it
(`ConfigError`), never a pydantic traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = Path("config/gateway.toml")


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it in one line."""


class Settings(BaseSettings):
    """Everything the gateway reads from its configuration."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    public_url: str
    twilio_auth_token: SecretStr
    gemini_api_key: SecretStr = Field(
        validation_alias=AliasChoices("gemini_api_key", "google_api_key")
    )
    gemini_model: str = "gemini-live-2.5-flash-preview"
    system_instruction: str = "You are a friendly, concise phone assistant. Keep answers short."
    voice: str = "Puck"
    greeting: str = ""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    max_calls: int = Field(default=200, ge=1)
    drain_timeout: float = Field(default=3600.0, ge=0)

    compression_trigger_tokens: int = Field(default=25600, ge=1000)
    compression_target_tokens: int = Field(default=12800, ge=100)
    replay_limit_s: float = Field(default=60.0, gt=0)
    reconnect_total_s: float = Field(default=30.0, gt=0)
    reconnect_max_attempts: int = Field(default=12, ge=1)
    goaway_margin_s: float = Field(default=1.0, ge=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)

    stream_token_ttl_s: float = Field(default=60.0, gt=0)
    start_timeout_s: float = Field(default=10.0, gt=0)
    idle_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("public_url")
    @classmethod
    def _public_url_is_http(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")) or "://" == value[-3:]:
            raise ValueError("must be an absolute http(s) URL, e.g. https://voice.example.com")
        return value.rstrip("/")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("GATEWAY_CONFIG", str(DEFAULT_CONFIG_FILE)))
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )


def load_settings(**overrides: object) -> Settings:
    """Build settings or raise ConfigError naming the first bad setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "configuration"
        if first["type"] == "missing":
            raise ConfigError(f"missing setting {name}") from None
        raise ConfigError(f"invalid setting {name}: {first['msg']}") from None
