"""Settings: `config/gateway.toml` defaults overridden by environment variables.

Missing or malformed settings stop the start with one line naming them all
(`ConfigError`), never a pydantic traceback.

Every setting is declared once, here, with its check and default; `config/gateway.toml`
documents the same defaults (a test holds the two together). The keys a persona may set
are declared in `PersonaSettings`: `Settings` inherits them as the default persona, and a
`[personas.NAME]` table (`PersonaConfig`) sets any of them. The Live session's knobs are
declared in `gateway.live.settings.LiveSettings` (the Live package reads them there) and
nest here as `Settings.live`, handed to each call as they are; they are read from flat keys
and variables (`REPLAY_LIMIT_S`), as operators have always set them.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gateway.live.settings import LiveSettings as LiveSettings  # nested as `Settings.live`

DEFAULT_CONFIG_FILE = Path("config/gateway.toml")
#: How deploy/gateway.env.example and the example Secret mark a value still to fill in.
PLACEHOLDER = "REPLACE_ME"


class ConfigError(Exception):
    """Settings are missing or malformed; the message names each of them, in one line."""


ToolName = Literal["end_call", "transfer_call"]
ThinkingLevel = Literal["minimal", "low", "medium", "high"]
Sensitivity = Literal["high", "low"]
# A called number as Twilio sends it in `To` (E.164), or a SIP address.
_NUMBER = re.compile(r"^\+[1-9]\d{6,14}$")
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


def address_key(value: str) -> str:
    """The one spelling of a phone address: a number without spaces, dashes, dots and
    brackets, or `sip:` (in lower case) and the rest as given. Not a check."""
    text = value.strip()
    if text.lower().startswith("sip:"):
        return "sip:" + text[4:]
    return re.sub(r"[\s().-]", "", text)


def phone_address(value: str) -> str:
    """An E.164 number or a sip: address, in its `address_key` spelling; else ValueError."""
    key = address_key(value)
    if key.startswith("sip:"):
        if len(key) <= 4 or any(c.isspace() for c in key):
            raise ValueError(f"not a SIP address: {value!r}")
    elif not _NUMBER.match(key):
        raise ValueError(f"not an E.164 number (+ and digits) or sip: address: {value!r}")
    return key


# Instructions the gateway sends the model on its own (each a text turn); a persona may
# change any of them. The default persona greets, so a fresh install answers like a phone
# system; "" turns the greeting off.
GREETING = "Greet the caller briefly and ask how you can help."
WRAP_UP = (
    "The call has almost reached its time limit. Tell the caller briefly that you have to "
    "end the call now, thank them and say goodbye."
)
SILENCE_PROMPT = (
    "The caller has not said anything for a while. Ask briefly whether they are still there."
)
SILENCE_GOODBYE = "The caller is still silent. Say a short, polite goodbye; the call then ends."
# Token kinds a price may be given for: prompt_audio, response_text, ...
TOKEN_KINDS = frozenset(
    f"{side}_{modality}"
    for side in ("prompt", "response")
    for modality in ("audio", "text", "image", "video", "document")
)


class PersonaSettings(BaseModel):
    """The keys a persona may set, each declared once with its check and default: the
    top-level settings (`Settings` inherits them, so a variable such as `VOICE` sets the
    default persona) and every `[personas.NAME]` table (`PersonaConfig`, where the keys
    a table sets override what it inherits) read these same fields."""

    gemini_model: str = "gemini-3.8-live"
    # The model's own settings, checked against its profile at start (gateway.live.profiles):
    # unset, the model's default.
    thinking_level: ThinkingLevel | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    # The service's voice activity detection: how readily it hears speech start and end,
    # audio kept before a start, the silence that ends a turn (ms); unset: its defaults.
    vad_start_sensitivity: Sensitivity | None = None
    vad_end_sensitivity: Sensitivity | None = None
    vad_prefix_padding_ms: int | None = Field(default=None, ge=0)
    vad_silence_ms: int | None = Field(default=None, ge=0)
    barge_in: bool = True  # the caller's speech interrupts the model (false: it finishes)
    # Transcripts of what the caller and the model say (the transcript file, the brief of
    # a fresh session after a refused handle, telling a resumed model's repeat need them).
    input_transcription: bool = True
    output_transcription: bool = True
    # BCP-47 languages the transcriptions expect (hints); empty: detected.
    transcription_languages: list[str] = []
    system_instruction: str = "You are a friendly, concise phone assistant. Keep answers short."
    voice: str = "Puck"
    greeting: str = GREETING
    language: str = ""  # BCP-47 speech language (e.g. en-US); empty: the model's choice
    tools: list[ToolName] = []
    transfer_to: dict[str, str] = {}  # name -> E.164 number or sip: address
    # What the gateway does on its own during a call (see personas.CallPolicy).
    record: bool = False
    voicemail: str = ""
    max_call_s: float = Field(default=0.0, ge=0)
    max_call_tokens: int = Field(default=0, ge=0)
    max_call_usd: float = Field(default=0.0, ge=0)  # needs TOKEN_PRICES
    max_day_usd: float = Field(default=0.0, ge=0)  # per persona and UTC day; needs TOKEN_PRICES
    wrap_up_at: float = Field(default=0.9, gt=0, le=1)
    wrap_up: str = WRAP_UP
    silence_timeout_s: float = Field(default=0.0, ge=0)
    silence_prompt: str = SILENCE_PROMPT
    silence_goodbye: str = SILENCE_GOODBYE

    @field_validator("transfer_to")
    @classmethod
    def _transfer_to(cls, value: dict[str, str]) -> dict[str, str]:
        return {name: phone_address(target) for name, target in value.items()}

    @field_validator("language")
    @classmethod
    def _language(cls, value: str) -> str:
        if value and not _LANGUAGE.match(value):
            raise ValueError(f"not a BCP-47 language code such as en-US: {value!r}")
        return value

    @field_validator("transcription_languages")
    @classmethod
    def _transcription_languages(cls, value: list[str]) -> list[str]:
        for code in value:
            if not _LANGUAGE.match(code):
                raise ValueError(f"not a BCP-47 language code such as en-US: {code!r}")
        return value

    def persona_keys(self) -> dict[str, Any]:
        """The per-persona keys' values: what a persona table inherits from these."""
        return {name: getattr(self, name) for name in PersonaSettings.model_fields}


class PersonaConfig(PersonaSettings):
    """One `[personas.NAME]` table: the numbers it answers and the keys it sets
    (`overrides`); a key left out takes the top-level setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    numbers: list[str] = []

    @field_validator("numbers")
    @classmethod
    def _numbers(cls, value: list[str]) -> list[str]:
        return [phone_address(v) for v in value]

    def overrides(self) -> dict[str, Any]:
        """The per-persona keys this table sets, with their values."""
        return {name: getattr(self, name) for name in self.model_fields_set - {"numbers"}}


class _LiveVariables(PydanticBaseSettingsSource):
    """The Live settings' flat environment variables (`REPLAY_LIMIT_S`, ...), which the
    standard source does not read for a nested model."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything happens in __call__

    def __call__(self) -> dict[str, Any]:
        found = {key.lower(): value for key, value in os.environ.items()}
        return {name: found[name] for name in LiveSettings.model_fields if name in found}


class Settings(PersonaSettings, BaseSettings):
    """Everything the gateway reads from its configuration: its own settings here, the
    default persona's (`PersonaSettings`) inherited."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    # Twilio opens media streams only over wss:// (its error 31922), which the gateway derives
    # from PUBLIC_URL: http:// is refused unless allowed, for a test bed without Twilio.
    allow_http_public_url: bool = False
    public_url: str  # after allow_http_public_url: its check reads it
    twilio_auth_token: SecretStr
    # The Live backend, read as the google-genai SDK reads it (gateway.backend builds the
    # client): the Gemini API with a key, or Vertex AI (GOOGLE_GENAI_USE_VERTEXAI, or the
    # SDK's newer GOOGLE_GENAI_USE_ENTERPRISE, which wins) with a project, a location
    # (empty: global, as the SDK has it) and Application Default Credentials, or a Vertex
    # express-mode key (GEMINI_API_KEY or GOOGLE_API_KEY, used when no project is set).
    vertexai: bool = Field(
        default=False,
        validation_alias=AliasChoices(
            "google_genai_use_enterprise", "google_genai_use_vertexai", "vertexai"
        ),
    )
    gemini_api_key: SecretStr | None = Field(  # after vertexai: its check reads it
        default=None,
        validate_default=True,
        validation_alias=AliasChoices("gemini_api_key", "google_api_key"),
    )
    google_cloud_project: str = ""
    google_cloud_location: str = ""
    # How often the key and the models are checked again with the backend's models API
    # (at start, a refusal stops the gateway; later, /readyz fails while it lasts).
    model_check_interval_s: float = Field(default=300.0, gt=0)
    token_prices: dict[str, float] = {}  # USD per million tokens, by TOKEN_KINDS
    personas: dict[str, PersonaConfig] = {}
    transcript_dir: Path | None = None  # one JSON Lines file per call; unset: off
    # REST API (tools, outbound calls). Inbound calls use the account of the call itself.
    twilio_account_sid: str = ""
    twilio_from_number: str = ""  # caller ID for outbound calls without a persona number
    hangup_wait_s: float = Field(default=20.0, gt=0)  # longest wait for the last words to play

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    max_calls: int = Field(default=200, ge=1)
    drain_timeout: float = Field(default=3600.0, ge=0)
    # On a drain with another replica ready (REDIS_URL), each call is handed off at its next
    # pause, at the latest after this long.
    hand_off_wait_s: float = Field(default=10.0, gt=0)
    # ... from this long after the signal: what a load balancer takes to stop sending streams
    # to a draining replica (Kubernetes: the endpoint removal spreads in under a second to a
    # couple in a small cluster, more in a large one). A stream sent back meanwhile is taken
    # and handed on again (one more gap for its caller): the delay trades drain time for that.
    hand_off_delay_s: float = Field(default=2.0, ge=0)

    live: LiveSettings = LiveSettings()
    # Caller audio sent to the model in pieces of this many ms. 40 (two Twilio frames): half
    # the messages to the model and half the resampler calls of 20 (every frame as it comes),
    # for 20 ms more on the first frame of each piece, which no caller hears
    # (docs/benchmarks.md). A replay after a reset may send the last piece again (the service cannot
    # say whether a handle covers it), so the model may hear up to one piece twice there.
    caller_audio_batch_ms: int = Field(default=40, ge=20, le=100, multiple_of=20)
    # Stop streaming the caller's silence to the model (gateway.dtx; Gemini API only): after
    # a second of it the stream pauses (audioStreamEnd) until the caller makes a sound,
    # which goes out with the 0.3 s before it. The service bills audio by its duration and
    # every turn re-reads it (docs/benchmarks.md, "The model's bill").
    silence_suppression: bool = True
    # Offer permessage-deflate to the Live endpoint. Off: where the endpoint accepts it, every
    # caller audio message is deflated, ~0.1 ms of CPU each for ~30% fewer bytes of speech
    # (docs/benchmarks.md): worth it only where upstream bytes cost more than CPU.
    live_deflate: bool = False

    # Also how long a call answered with <Connect><Stream> holds its slot for its stream.
    stream_token_ttl_s: float = Field(default=60.0, gt=0)
    # A call's CallSid is remembered this long after its stream ended: a replayed voice
    # webhook for it opens no second stream meanwhile (one entry per call, ~200 bytes).
    call_memory_s: float = Field(default=86400.0, ge=0)
    # Where calls' state is shared by replicas (a Redis URL: redis://, rediss://, unix://);
    # unset: in this process (gateway.store). A replica that cannot reach it does not start.
    redis_url: SecretStr | None = None
    # A call's shared state outlives its last write this long (Twilio's default longest
    # call); an open stream's single-use memory lasts at most this long too.
    call_state_ttl_s: float = Field(default=14400.0, gt=0)
    start_timeout_s: float = Field(default=5.0, gt=0)  # an upgraded stream's `start`
    idle_timeout_s: float = Field(default=30.0, gt=0)
    # Caller audio may arrive this many times faster than real time, and run this far
    # ahead of the clock; beyond, the stream is closed (1008). Twilio sends in real time;
    # test beds that compress time raise the rate.
    caller_audio_rate: float = Field(default=1.0, ge=1.0)
    caller_audio_burst_s: float = Field(default=2.0, gt=0)
    # Audio queued for a caller that does not read (beyond about as much again in the
    # socket's buffers) before it is cut as a slow consumer.
    caller_send_buffer_s: float = Field(default=2.0, gt=0)

    # Every connection, before any signature: a new one's first request head, an idle
    # kept-alive one, a webhook's body; and how often peer errors are summed up in the log.
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    http_keepalive_s: float = Field(default=15.0, gt=0)
    http_body_timeout_s: float = Field(default=10.0, gt=0)
    peer_log_interval_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _gather_live(cls, data: Any) -> Any:
        """Flat Live keys (from any source) into `live`; what `live` holds already stays
        unless a flat key says otherwise."""
        if not isinstance(data, dict):
            return data
        flat = {k: v for k, v in data.items() if k.lower() in LiveSettings.model_fields}
        if not flat:
            return data
        nested = data.get("live") or {}
        if isinstance(nested, BaseModel):
            nested = nested.model_dump()
        rest = {k: v for k, v in data.items() if k not in flat}
        return {**rest, "live": {**nested, **{k.lower(): v for k, v in flat.items()}}}

    @field_validator("gemini_api_key")
    @classmethod
    def _key_on_the_gemini_api(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        """Required on the Gemini API; Vertex AI finds its credentials at start."""
        if value is None and info.data.get("vertexai") is False:
            raise PydanticCustomError("missing", "Field required")
        return value if value is None else filled_in(value)

    @field_validator("twilio_auth_token")
    @classmethod
    def _token_filled_in(cls, value: SecretStr) -> SecretStr:
        return filled_in(value)

    @field_validator("public_url")
    @classmethod
    def _public_url_is_http(cls, value: str, info: ValidationInfo) -> str:
        if not value.startswith(("https://", "http://")) or "://" == value[-3:]:
            raise ValueError("must be an absolute http(s) URL, e.g. https://voice.example.com")
        if value.startswith("http://") and not info.data.get("allow_http_public_url"):
            raise ValueError(
                "must be https:// (Twilio opens media streams only over wss://); "
                "ALLOW_HTTP_PUBLIC_URL=true allows http:// for a test bed without Twilio"
            )
        return value.rstrip("/")

    @field_validator("token_prices")
    @classmethod
    def _prices(cls, value: dict[str, float]) -> dict[str, float]:
        for kind, price in value.items():
            if kind not in TOKEN_KINDS:
                raise ValueError(f"unknown token kind {kind!r} (e.g. prompt_audio, response_text)")
            if price < 0:
                raise ValueError(f"{kind}: a price is not negative")
        return value

    @field_validator("twilio_from_number")
    @classmethod
    def _from_number(cls, value: str) -> str:
        return phone_address(value) if value else value

    @field_validator("transcript_dir", mode="before")
    @classmethod
    def _no_dir(cls, value: object) -> object:
        return None if value == "" else value

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
        sources = (init_settings, env_settings, _LiveVariables(settings_cls))
        path = config_file()
        if path is None:
            return sources
        try:
            return (*sources, TomlConfigSettingsSource(settings_cls, toml_file=path))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: not readable: {exc.strerror}") from None


def config_file() -> Path | None:
    """The toml file the settings are read from: ``GATEWAY_CONFIG``'s (empty: none), else
    ``config/gateway.toml`` in the working directory where there is one.

    A file named in ``GATEWAY_CONFIG`` must be there: a mistyped path would otherwise start
    the gateway on the built-in defaults, its personas left out, without a word.
    """
    named = os.environ.get("GATEWAY_CONFIG")
    if named is None:
        return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None
    if not named:
        return None
    if not Path(named).is_file():
        raise ConfigError(f"invalid setting GATEWAY_CONFIG: {named} is not a file")
    return Path(named)


def filled_in(secret: SecretStr) -> SecretStr:
    """`secret`, unless it is still the example's placeholder: a `TWILIO_AUTH_TOKEN` left as
    copied from deploy/gateway.env.example would start a gateway that refuses every call
    (Twilio's signatures checked against the placeholder)."""
    if secret.get_secret_value().startswith(PLACEHOLDER):
        raise ValueError(f"still the example's placeholder ({PLACEHOLDER}...): set the real one")
    return secret


def load_settings(kind: type[Settings] = Settings, /, **overrides: object) -> Settings:
    """Build settings or raise ConfigError naming every bad setting in one line: an operator
    who fixes one missing setting should not have to start again to learn the next. `kind`:
    a command's own view of them (`gateway.outbound.CallSettings`)."""
    try:
        return kind(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        errors = exc.errors()
    problems = []
    missing = [setting_name(e["loc"]) for e in errors if e["type"] == "missing"]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        problems.append(f"missing setting{plural} {', '.join(missing)}")
    for e in errors:
        if e["type"] != "missing":
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"invalid setting {setting_name(e['loc'])}: {msg}")
    raise ConfigError("; ".join(problems))


def required_settings() -> list[str]:
    """The settings without a default, as `python -m gateway --help` names them (the key:
    on the Gemini API)."""
    return [
        setting_name((name,))
        for name, f in Settings.model_fields.items()
        if f.is_required() or name == "gemini_api_key"
    ]


def setting_name(loc: tuple[int | str, ...]) -> str:
    """`PORT` for a top-level setting or a Live one (its variable), `personas.sales.voice`
    for a key in a table."""
    if not loc:
        return "configuration"
    field = Settings.model_fields.get(str(loc[0])) if len(loc) == 1 else None
    if field is not None and isinstance(field.validation_alias, AliasChoices):
        # One setting read under several names (GEMINI_API_KEY or GOOGLE_API_KEY).
        return " or ".join(str(c).upper() for c in field.validation_alias.choices)
    if len(loc) == 2 and loc[0] == "live":
        loc = loc[1:]
    if len(loc) == 1:
        return str(loc[0]).upper()
    name = str(loc[0])
    for part in loc[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name
