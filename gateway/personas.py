"""Who answers a number: system instruction, voice, language, greeting and tools per called number.

`config/gateway.toml` holds the top-level persona (`system_instruction`, `voice`, ...) and
`[personas.NAME]` tables with the `numbers` they answer; a key a table leaves out takes the
top-level value. `[personas.default]`, if present, changes the persona of every other number.
A mistake stops the start with one line naming the key (`ConfigError`): the table is built
once, at start, from the settings (which know nothing of it) and handed to what needs it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from gateway.config import (
    ConfigError,
    PersonaConfig,
    PersonaSettings,
    Settings,
    ToolName,
    address_key,
)
from gateway.live.profiles import BackendName, ModelSettings, problems, profile_for
from gateway.usage import prices_for

DEFAULT = "default"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


@dataclass(frozen=True)
class CallPolicy:
    """The gateway's own moves during a persona's calls (`gateway.watch`, `gateway.ending`):
    recording, the voicemail message, the limits and the silence watch."""

    record: bool = False  # ask Twilio to record the call (dual channel) when it starts
    voicemail: str = ""  # an outbound call reached a machine: leave this message; "" = hang up
    max_call_s: float = 0.0  # 0 = no limit
    max_call_tokens: int = 0  # 0 = no limit
    max_call_usd: float = 0.0  # the call's cost at TOKEN_PRICES; 0 = no limit
    max_day_usd: float = 0.0  # the persona's calls' cost per UTC day; 0 = no limit
    wrap_up_at: float = 0.9  # the share of any limit at which the model is told `wrap_up`
    wrap_up: str = ""
    silence_timeout_s: float = 0.0  # caller silent this long after the bot spoke; 0 = off
    silence_prompt: str = ""
    silence_goodbye: str = ""


@dataclass(frozen=True)
class Persona:
    """Everything a call's model gets from the number it was called on."""

    name: str
    system_instruction: str
    model: str = ""  # the Live model
    model_setting: str = "GEMINI_MODEL"  # where `model` was set, for what the backend says of it
    model_settings: ModelSettings = field(default_factory=ModelSettings)  # checked at start
    voice: str | None = None
    language: str | None = None
    greeting: str = ""  # a text turn sent at the start so the bot speaks first; "" = off
    tools: tuple[ToolName, ...] = ()
    transfer_to: Mapping[str, str] = field(default_factory=dict)
    numbers: tuple[str, ...] = ()
    policy: CallPolicy = field(default_factory=CallPolicy)


@dataclass(frozen=True)
class PersonaTable:
    """Personas by name and by called number, with the default for any other number."""

    default: Persona
    by_name: Mapping[str, Persona]
    by_number: Mapping[str, Persona]

    def get(self, name: str | None) -> Persona:
        """The persona called `name`; the default for None or an unknown name."""
        return self.by_name.get(name or "", self.default)

    def for_number(self, number: str | None) -> Persona:
        """The persona that answers `number` (as Twilio sends `To`); else the default."""
        if not number:
            return self.default
        return self.by_number.get(address_key(number), self.default)

    def answering(self, params: Mapping[str, str], named: str | None = None) -> Persona:
        """Who answers a call Twilio's voice webhook asks about (`params`, its form).

        `named` (`?persona=` on the calls we place) if it is a persona; else the one of
        our own number in the call: `To`, or `From` on an outbound call placed elsewhere;
        else the default.
        """
        if named and named in self.by_name:
            return self.by_name[named]
        outbound = params.get("Direction", "inbound").startswith("outbound")
        return self.for_number(params.get("From" if outbound else "To"))

    @classmethod
    def from_settings(cls, settings: Settings) -> PersonaTable:
        """Resolve inheritance and check what a single key cannot: raises ConfigError."""
        base = PersonaSettings.model_construct(**settings.persona_keys())
        configs = dict(settings.personas)
        default_config = configs.pop(DEFAULT, PersonaConfig())
        default_key = f"personas.{DEFAULT}" if DEFAULT in settings.personas else ""
        backend: BackendName = "vertex" if settings.vertexai else "gemini"
        default = _resolve(DEFAULT, default_config, base, default_key, "GEMINI_MODEL", backend)
        # Named personas inherit the top level, then what [personas.default] changed.
        inherited = base.model_copy(update=default_config.overrides())
        by_name = {DEFAULT: default}
        for name, config in configs.items():
            if not _NAME.match(name):
                raise ConfigError(
                    f"invalid setting personas.{name}: a name is 1-40 letters, digits, - or _"
                )
            key = f"personas.{name}"
            by_name[name] = _resolve(name, config, inherited, key, default.model_setting, backend)
        by_number: dict[str, Persona] = {}
        for persona in by_name.values():
            for limit in ("max_call_usd", "max_day_usd"):
                if getattr(persona.policy, limit) and not prices_for(
                    persona.model, settings.token_prices
                ):
                    key = "" if persona.name == DEFAULT else f"personas.{persona.name}."
                    raise ConfigError(
                        f"invalid setting {key}{limit}: needs TOKEN_PRICES ({persona.model} "
                        "has no price sheet)"
                    )
            for number in persona.numbers:
                other = by_number.get(number)
                if other is not None:
                    raise ConfigError(
                        f"invalid setting personas.{persona.name}.numbers: {number} "
                        f"is already answered by personas.{other.name}"
                    )
                by_number[number] = persona
        return cls(default=default, by_name=by_name, by_number=by_number)

    def models(self) -> dict[str, str]:
        """Every model a persona uses, with the setting that chose it (the first one)."""
        found: dict[str, str] = {}
        for persona in self.by_name.values():
            found.setdefault(persona.model, persona.model_setting)
        return found


# Keys of the gateway's own moves during a call (`CallPolicy`), inherited like the others.
_POLICY_KEYS = tuple(f.name for f in fields(CallPolicy))


# Keys of what the setup asks of the model (gateway.live.profiles.ModelSettings), checked
# against the model's profile.
_MODEL_KEYS = tuple(f.name for f in fields(ModelSettings))


def _resolve(
    name: str,
    config: PersonaConfig,
    base: PersonaSettings,
    key: str,
    base_model: str,
    backend: BackendName,
) -> Persona:
    """`key` is where the table lives (`personas.NAME`), or "" for the top-level settings;
    `base_model` is the setting the inherited model comes from."""

    def where(setting: str) -> str:
        return f"{key}.{setting}" if key else setting.upper()

    own = config.overrides()
    values = base.model_copy(update=own)
    tools = tuple(dict.fromkeys(values.tools))
    transfer_to = values.transfer_to
    if "transfer_call" in tools and not transfer_to:
        raise ConfigError(
            f"missing setting {where('transfer_to')} (the transfer_call tool needs a target)"
        )
    for target in transfer_to:
        if not _NAME.match(target):
            raise ConfigError(
                f"invalid setting {where('transfer_to')}.{target}: "
                "a name is 1-40 letters, digits, - or _"
            )
    model = values.gemini_model
    if not model.strip():
        raise ConfigError(f"invalid setting {where('gemini_model')}: must not be empty")
    asked = {key: getattr(values, key) for key in _MODEL_KEYS}
    asked["transcription_languages"] = tuple(asked["transcription_languages"])
    model_settings = ModelSettings(**asked)
    for setting, why in problems(profile_for(model, backend), model_settings):
        raise ConfigError(f"invalid setting {where(setting)}: {why}")
    instruction = values.system_instruction
    if not instruction.strip():
        raise ConfigError(f"invalid setting {where('system_instruction')}: must not be empty")
    policy = {key: getattr(values, key) for key in _POLICY_KEYS}
    needs: list[tuple[str, tuple[str, ...]]] = [
        ("silence_timeout_s", ("silence_prompt", "silence_goodbye"))
    ]
    needs += [
        (limit, ("wrap_up",))
        for limit in ("max_call_s", "max_call_tokens", "max_call_usd", "max_day_usd")
    ]
    for switch, texts in needs:
        for text in texts:
            if policy[switch] and not str(policy[text]).strip():
                raise ConfigError(
                    f"invalid setting {where(text)}: must not be empty when {where(switch)} is set"
                )
    return Persona(
        name=name,
        system_instruction=instruction,
        model=model,
        model_setting=where("gemini_model") if "gemini_model" in own else base_model,
        model_settings=model_settings,
        voice=values.voice or None,
        language=values.language or None,
        greeting=values.greeting,
        tools=tools,
        transfer_to=dict(transfer_to),
        numbers=tuple(config.numbers),
        policy=CallPolicy(**policy),
    )
