"""How the Live emulator plays each model: what its setup refuses and how it behaves.

Written from ``/work/shared/live-models.md`` (keys in brackets; §9 is the matrix, §10 the
knob list), apart from the gateway's own table (`gateway.live.profiles`), so a test of the
gateway against a model is a test, not the table read back. Where the real close code is
not known the knob says what the default rests on; every knob can be changed per test
(``EmulatorConfig.behaviours``).

Setup refusals close the socket after the setup with ``refusal_code`` (default 1007
"Request contains an invalid argument.": the code the service uses for invalid payloads
[LK5262][SOKUJI]; the per-field code for 3.8's refusals is not published, §11.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ClientContentPolicy = Literal["any_time", "initial_history_only"]
ToolBehaviour = Literal["BLOCKING", "NON_BLOCKING"]


@dataclass(frozen=True)
class ModelBehaviour:
    """One model as the emulator plays it."""

    # Setup fields refused (camelCase paths): "thinkingConfig" (any), "enableAffectiveDialog",
    # "proactivity" (any), "proactiveAudio=false".
    refuses: frozenset[str] = frozenset()
    thinking_levels: frozenset[str] = frozenset()  # accepted thinkingLevel (empty: any)
    refusal_code: int = 1007
    client_content: ClientContentPolicy = "any_time"
    tool_default: ToolBehaviour = "BLOCKING"
    tool_behaviours: frozenset[ToolBehaviour] = frozenset({"BLOCKING", "NON_BLOCKING"})
    multi_part: bool = False  # audio chunks and the transcript in one serverContent
    input_transcription_always: bool = False  # sent even when the setup did not ask
    # The caller's transcript in pieces while they speak (its first word once speech is
    # heard, the rest at the utterance's end), not one piece at the end.
    input_transcription_incremental: bool = False
    output_transcription_always: bool = False
    # A connection closed this long after its setup, without goAway (None: no cap).
    session_cap_s: float | None = None
    cap_close: tuple[int, str] = (1011, "Deadline expired before operation could complete.")
    # A resume of a capped session: accepted (None) or refused with this close. After 3.8's
    # 58:00 close one resume worked, a later one was refused with 1007 [D186392].
    resume_after_cap: tuple[int, str] | None = None
    # The backends ("gemini", "vertex") on which a contextUpdate (a new system instruction
    # mid-session) is taken; elsewhere it closes with `refusal_code`. Nothing unlisted takes
    # it: acceptance is documented for Vertex AI's 3.8 only [VSESS].
    context_update: frozenset[str] = frozenset()
    sources: str = ""


#: The models the emulator plays; a model not listed is played permissively (any setup
#: field, clientContent any time, blocking tools, one part per message).
BEHAVIOURS: dict[str, ModelBehaviour] = {
    # 3.8: thinking config, affective dialog and proactive_audio:false are errors [G38]
    # [GTHINK][M3P]; clientContent the whole session [G38]; NON_BLOCKING by default, BLOCKING
    # allowed [G38]; several parts per event [SKILL]; output transcripts even unasked
    # [D188765]; a connection closed at 58:00 with 1011
    # "Deadline expired before operation could complete." and no goAway seen [D186392];
    # "Update system instructions and tools during a session" on Vertex AI [VSESS] (on the
    # Gemini API: not found).
    "gemini-3.8-live": ModelBehaviour(
        refuses=frozenset({"thinkingConfig", "enableAffectiveDialog", "proactiveAudio=false"}),
        tool_default="NON_BLOCKING",
        multi_part=True,
        output_transcription_always=True,  # "still arrives with its configuration omitted"
        session_cap_s=58 * 60.0,
        context_update=frozenset({"vertex"}),
        sources="[G38][GTHINK][M3P][SKILL][D186392][D188765][VSESS]",
    ),
    # 3.8 extended thinking: thinkingLevel low/medium/high, MINIMAL refused [GTHINK]; no
    # affective dialog, proactive_audio:false refused [M3P][MJ]; NON_BLOCKING only:
    # "Synchronous blocking tools return an error" [GTHINK].
    "gemini-3.8-live-extended-thinking": ModelBehaviour(
        refuses=frozenset({"enableAffectiveDialog", "proactiveAudio=false"}),
        thinking_levels=frozenset({"low", "medium", "high"}),
        tool_default="NON_BLOCKING",
        tool_behaviours=frozenset({"NON_BLOCKING"}),
        multi_part=True,
        sources="[G38ET][GTHINK][M3P][MJ]",
    ),
    # 3.1: thinkingLevel minimal..high [G31]; proactivity and affective dialog not supported
    # [G31][SKILL]; clientContent only as initial history (historyConfig), else 1007 after
    # the conversation started [SKILL][LK5251][LK5262] (the newer page says any time, §11.1:
    # the knob plays the stricter reading); blocking tools only [G31][GTOOLS]; input
    # transcription always on, at the end of the utterance [D171882][D136977]; several parts
    # per event [G31].
    "gemini-3.1-flash-live-preview": ModelBehaviour(
        refuses=frozenset({"proactivity", "enableAffectiveDialog"}),
        thinking_levels=frozenset({"minimal", "low", "medium", "high"}),
        client_content="initial_history_only",
        tool_behaviours=frozenset({"BLOCKING"}),
        multi_part=True,
        input_transcription_always=True,
        sources="[G31][SKILL][LK5251][LK5262][GTOOLS][D171882][D136977]",
    ),
    # 2.5 native audio: thinkingBudget, proactivity, affective dialog [GCAPold]; blocking by
    # default, async supported [GTOOLS]; one part per event [GCAPold]; the caller's
    # transcript streamed while they speak (what 3.1 was reported to no longer do) [D136977].
    "gemini-2.5-flash-native-audio-preview-12-2025": ModelBehaviour(
        refuses=frozenset({"thinkingLevel"}),
        input_transcription_incremental=True,
        sources="[GCAPold][GTOOLS][G25][D136977]",
    ),
}


def setup_refusal(behaviour: ModelBehaviour, setup: dict[str, Any]) -> str | None:
    """Why `behaviour`'s model refuses this (camelCase) setup, or None."""
    gen = setup.get("generationConfig")
    gen = gen if isinstance(gen, dict) else {}
    thinking = gen.get("thinkingConfig") or setup.get("thinkingConfig")
    refuses = behaviour.refuses
    if thinking is not None:
        if "thinkingConfig" in refuses:
            return "thinking_config is not supported for this model."
        level = thinking.get("thinkingLevel") if isinstance(thinking, dict) else None
        if level is not None:
            if "thinkingLevel" in refuses:
                return "thinking_level is not supported for this model."
            allowed = behaviour.thinking_levels
            if allowed and str(level).lower() not in allowed:
                return f"thinking_level {level} is not supported for this model."
    affective = gen.get("enableAffectiveDialog", setup.get("enableAffectiveDialog"))
    if affective is not None and "enableAffectiveDialog" in refuses:
        return "Unknown field enable_affective_dialog."
    proactivity = setup.get("proactivity")
    if proactivity is not None:
        if "proactivity" in refuses:
            return "proactivity is not supported for this model."
        if (
            isinstance(proactivity, dict)
            and proactivity.get("proactiveAudio") is False
            and "proactiveAudio=false" in refuses
        ):
            return "Proactive audio cannot be disabled on this model."
    for name, behaviour_name in declared_tools(setup).items():
        used = behaviour_name or behaviour.tool_default
        if used not in behaviour.tool_behaviours:
            return f"{used} function calling is not supported for this model ({name})."
    return None


def instruction_text(content: Any) -> str:
    """The text of a (camelCase) system instruction: a Content's parts, or a plain string."""
    if isinstance(content, str):
        return content
    parts = content.get("parts") if isinstance(content, dict) else None
    return "".join(
        str(p.get("text", "")) for p in parts or [] if isinstance(p, dict) and "text" in p
    )


def declared_tools(setup: dict[str, Any]) -> dict[str, str | None]:
    """Each declared function's name and the behavior it declares (None: none)."""
    found: dict[str, str | None] = {}
    for tool in setup.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        for decl in tool.get("functionDeclarations") or []:
            if isinstance(decl, dict) and isinstance(decl.get("name"), str):
                behaviour = decl.get("behavior")
                found[decl["name"]] = str(behaviour) if behaviour is not None else None
    return found


@dataclass
class ToolModes:
    """Whether the model waits for a function's response: as declared, else its default."""

    declared: dict[str, str | None] = field(default_factory=dict)
    default: ToolBehaviour = "BLOCKING"

    @classmethod
    def of(cls, behaviour: ModelBehaviour, setup: dict[str, Any]) -> ToolModes:
        return cls(declared_tools(setup), behaviour.tool_default)

    def non_blocking(self, name: str) -> bool:
        return (self.declared.get(name) or self.default) == "NON_BLOCKING"
