"""Outbound calls: `python -m gateway call --to +E164 [--persona NAME] [--from +E164]`.

The call is placed through the Twilio REST API with `Url` = PUBLIC_URL/twilio/voice
?persona=NAME, so when the callee answers Twilio asks the gateway, which answers with the
media stream like for any inbound call, and that persona speaks. The status callback
(PUBLIC_URL/twilio/status) records how the call ended. Twilio's answering-machine
detection runs asynchronously (`DetectMessageEnd`): its result comes to
PUBLIC_URL/twilio/amd once a machine's greeting has ended (or a person answered), and a
machine gets the persona's voicemail message, or a hang-up (`gateway.call`).

The caller ID is `--from`, else the persona's first phone number, else TWILIO_FROM_NUMBER;
without `--persona` the persona is the one answering that caller ID (else the default).
It reads Twilio's settings only (`CallSettings`): PUBLIC_URL, TWILIO_AUTH_TOKEN,
TWILIO_ACCOUNT_SID and a caller ID; no Live backend key.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from urllib.parse import urlencode

from pydantic import SecretStr, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import SettingsConfigDict

from gateway.call_factory import PERSONA_PARAMETER
from gateway.config import ConfigError, Settings, load_settings, phone_address
from gateway.logs import configure_logging
from gateway.personas import PersonaTable
from gateway.twilio.rest import RestError, TwilioRest

log = logging.getLogger(__name__)


class CallSettings(Settings):
    """The settings as `python -m gateway call` reads them: Twilio's.

    Placing a call is one REST request to Twilio; the model speaks through the gateway that
    Twilio then asks, with its own settings. So the Live backend's key is not asked for, and
    TWILIO_ACCOUNT_SID (optional for serving) is: a missing one is named with any other
    missing setting, in one line. No setting is declared here.
    """

    model_config = SettingsConfigDict(validate_default=True)  # TWILIO_ACCOUNT_SID's "" too

    @field_validator("gemini_api_key")
    @classmethod
    def _key_on_the_gemini_api(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        """Replaces `Settings`' check of the same name: placing a call uses no Live backend."""
        return value

    @field_validator("twilio_account_sid")
    @classmethod
    def _account_needed(cls, value: str) -> str:
        if not value:
            raise PydanticCustomError("missing", "Field required")
        return value


@dataclass(frozen=True)
class OutboundCall:
    """What was asked of Twilio."""

    sid: str
    to: str
    from_: str
    persona: str
    url: str


async def place_call(
    settings: Settings,
    personas: PersonaTable,
    to: str,
    *,
    persona: str | None = None,
    from_: str | None = None,
    rest: TwilioRest | None = None,
) -> OutboundCall:
    """Place a call; raises ConfigError (bad input or settings) or RestError (Twilio said no)."""
    account = settings.twilio_account_sid
    if not account:
        raise ConfigError("missing setting TWILIO_ACCOUNT_SID (needed to place calls)")
    try:
        callee = phone_address(to)
    except ValueError as exc:
        raise ConfigError(f"invalid --to: {exc}") from None
    if persona is not None and persona not in personas.by_name:
        known = ", ".join(sorted(personas.by_name))
        raise ConfigError(f"invalid --persona: unknown persona {persona!r} (known: {known})")
    chosen = personas.by_name[persona] if persona is not None else None
    caller_id = from_ or ""
    if not caller_id and chosen is not None:
        caller_id = next((n for n in chosen.numbers if n.startswith("+")), "")
    caller_id = caller_id or settings.twilio_from_number
    if not caller_id:
        raise ConfigError(
            "missing setting TWILIO_FROM_NUMBER (the caller ID; or --from, or a persona number)"
        )
    try:
        caller_id = phone_address(caller_id)
    except ValueError as exc:
        raise ConfigError(f"invalid --from: {exc}") from None
    if chosen is None:
        chosen = personas.for_number(caller_id)
    query = urlencode({PERSONA_PARAMETER: chosen.name})
    url = f"{settings.public_url}/twilio/voice?{query}"
    owned = rest is None
    client = rest or TwilioRest(settings.twilio_auth_token.get_secret_value())
    try:
        sid = await client.create_call(
            account,
            to=callee,
            from_=caller_id,
            url=url,
            method="POST",
            status_callback=f"{settings.public_url}/twilio/status",
            status_callback_method="POST",
            # Answering-machine detection, asynchronous: the call connects at once and the
            # result (after a machine's greeting has ended) comes to /twilio/amd.
            machine_detection="DetectMessageEnd",
            async_amd="true",
            async_amd_status_callback=f"{settings.public_url}/twilio/amd",
            async_amd_status_callback_method="POST",
        )
    finally:
        if owned:
            await client.close()
    log.info("placed call %s with persona %s", sid, chosen.name)
    return OutboundCall(sid=sid, to=callee, from_=caller_id, persona=chosen.name, url=url)


async def run_call_command(
    settings: Settings,
    personas: PersonaTable,
    to: str,
    persona: str | None,
    from_: str | None,
    *,
    rest: TwilioRest | None = None,
) -> int:
    """The `call` subcommand: prints the call SID; exit 2 on bad input, 1 if Twilio refused."""
    try:
        call = await place_call(settings, personas, to, persona=persona, from_=from_, rest=rest)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except RestError as exc:
        print(f"gateway: Twilio refused the call: {exc}", file=sys.stderr)
        return 1
    print(f"{call.sid} {call.from_} -> {call.to} (persona {call.persona})")
    return 0


async def call_main(
    to: str, persona: str | None, from_: str | None, *, rest: TwilioRest | None = None
) -> int:
    """`python -m gateway call`: its settings (`CallSettings`) and personas, then the call.
    Exit 2 with one line naming what is missing or malformed."""
    try:
        settings = load_settings(CallSettings)
        personas = PersonaTable.from_settings(settings)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    return await run_call_command(settings, personas, to, persona, from_, rest=rest)
