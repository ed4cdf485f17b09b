"""What each Live model accepts and how it behaves: one table, from public sources.

The Live models of late 2026 differ in what their setup may carry (3.8 refuses any
``thinkingConfig``, ``enableAffectiveDialog`` and ``proactiveAudio: false``), in how text
reaches them mid-call (3.1 was reported to refuse ``clientContent`` after the first model
turn), in how tools behave (3.8 keeps talking while a tool runs) and in how they report
usage. The setup a call sends is built from its model's `Profile` (`setup_fields`,
`declare_tools`), so the gateway never sends what the model refuses; a persona setting the
model does not take stops the start (`problems`).

Every row cites the source keys of ``/work/shared/live-models.md`` (§9 is the matrix).
Where sources conflict, the profile picks what works under every reading: on 3.1 a fresh
session's history goes as initial history (``historyConfig.initialHistoryInClientContent``,
one ``clientContent`` ending with ``turnComplete`` before anything else) and every text
turn after it as ``realtimeInput.text`` [GCAPold][SKILL][LK5251] vs [G31] (§11.1).

A model the table does not list gets its family's profile by name (a newer 2.5 native-audio
preview is a 2.5), else the cautious `fallback`: nothing optional in the setup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from google.genai import types

BackendName = Literal["gemini", "vertex"]
#: What ``generationConfig.thinkingConfig`` may carry: nothing, ``thinkingLevel``, or
#: ``thinkingBudget``.
ThinkingKind = Literal["none", "level", "budget"]
#: How a text turn reaches the model mid-call: ``clientContent`` with ``turnComplete``, or
#: ``realtimeInput.text``.
TextChannel = Literal["client_content", "realtime_text"]
#: How a fresh session gets the conversation so far: ``clientContent`` turns at any time,
#: or initial history announced in the setup and sent before anything else.
HistoryChannel = Literal["client_content", "initial_history"]
UsageShape = Literal["gemini_api", "vertex"]


@dataclass(frozen=True)
class Profile:
    """One model on one backend: what its setup may carry and how it behaves."""

    model: str
    backend: BackendName = "gemini"
    thinking: ThinkingKind = "none"
    thinking_levels: tuple[str, ...] = ()  # accepted thinkingLevel values (lower case)
    proactive_audio: bool = False  # the setup may carry proactivity.proactiveAudio
    affective_dialog: bool = False  # the setup may carry enableAffectiveDialog
    text: TextChannel = "client_content"
    history: HistoryChannel = "client_content"
    # behavior declared on every function (None: the model's default, declared as nothing)
    tool_behavior: Literal["BLOCKING", "NON_BLOCKING"] | None = None
    tools_non_blocking: bool = False  # the model goes on talking while a tool runs
    # FunctionResponse.scheduling is taken (NON_BLOCKING calls): an ending tool's answer goes
    # SILENT, so the model adds nothing after its goodbye
    tool_scheduling: bool = False
    usage: UsageShape = "gemini_api"
    multi_part: bool = False  # several parts (audio and transcript) in one serverContent
    input_transcription_always: bool = False  # input transcripts come even unasked
    output_transcription_always: bool = False  # output transcripts come even unasked
    session_cap_s: float | None = None  # a reported hard end of a session's connection
    # contextUpdate{systemInstruction} is taken mid-session: what compression drops is carried
    # there (gateway.live.essentials). Documented for Vertex AI's 3.8 only [VSESS]; unknown
    # elsewhere, so not sent.
    context_update: bool = False
    sources: str = ""

    @property
    def audio_stream_end(self) -> bool:
        """Whether ``realtimeInput.audioStreamEnd`` (a pause in the caller's audio) may be
        sent: on the Gemini API [SKILL][D171882]; Vertex's wire reference has no such field,
        "implicit on silence" [VSAMP] (§9 row 36)."""
        return self.backend == "gemini"

    @property
    def label(self) -> str:
        """``gemini:gemini-3.8-live``: the profile's name in logs and test ids."""
        return f"{self.backend}:{self.model}"


_2_5 = dict(
    thinking="budget",
    proactive_audio=True,
    affective_dialog=True,
    tool_behavior=None,
    sources="[GCAPold][GTOOLS][G25][SDK]",
)

#: The table. Gemini API rows first, then Vertex AI's.
PROFILES: tuple[Profile, ...] = (
    Profile(
        # No thinkingConfig, no affective dialog, proactive audio always on (false is an
        # error) [G38][GTHINK]; clientContent the whole session [G38]; NON_BLOCKING tools by
        # default [G38]; several parts per serverContent [SKILL]; a connection closed at
        # 58:00 with 1011 "Deadline expired" [D186392].
        "gemini-3.8-live",
        tools_non_blocking=True,
        tool_scheduling=True,
        multi_part=True,
        output_transcription_always=True,  # "still arrives with its configuration omitted"
        session_cap_s=58 * 60.0,
        sources="[G38][GTHINK][SKILL][D186392][D188765]",
    ),
    Profile(
        # thinkingLevel low/medium/high, not minimal [GTHINK][GCAPnew][AGORA]; tools must be
        # NON_BLOCKING ("synchronous blocking tools return an error") [G38ET][GTHINK];
        # scheduling reported unsupported [M3P][MJ]: not sent.
        "gemini-3.8-live-extended-thinking",
        thinking="level",
        thinking_levels=("low", "medium", "high"),
        tool_behavior="NON_BLOCKING",
        tools_non_blocking=True,
        multi_part=True,
        sources="[G38ET][GTHINK][GCAPnew][M3P]",
    ),
    Profile(
        # thinkingLevel minimal (default)/low/medium/high [G31]; no proactivity or affective
        # dialog [G31][SKILL]; clientContent as initial history only vs the whole session
        # (§11.1): history as initial history, text as realtimeInput.text [SKILL][LK5238];
        # blocking tools only [G31][GTOOLS]; input transcription always on, at the end of
        # each utterance [D171882][D136977]; several parts per serverContent [G31].
        "gemini-3.1-flash-live-preview",
        thinking="level",
        thinking_levels=("minimal", "low", "medium", "high"),
        text="realtime_text",
        history="initial_history",
        multi_part=True,
        input_transcription_always=True,
        sources="[G31][GCAPold][SKILL][LK5251][LK5262][D171882][D136977]",
    ),
    Profile("gemini-2.5-flash-native-audio-preview-12-2025", **_2_5),  # type: ignore[arg-type]
    Profile("gemini-2.5-flash-native-audio-preview-09-2025", **_2_5),  # type: ignore[arg-type]
    Profile(
        # thinking_budget [Vertex capabilities ja]; proactive audio preview [VPROACT];
        # affective dialog [V25]; all function calls non-blocking by default [VASYNC];
        # usage as candidatesTokenCount [SDK].
        "gemini-live-2.5-flash-native-audio",
        backend="vertex",
        thinking="budget",
        proactive_audio=True,
        affective_dialog=True,
        tools_non_blocking=True,
        tool_scheduling=True,
        usage="vertex",
        sources="[V25][VPROACT][VASYNC][SDK]",
    ),
    Profile(
        # Thinking on Vertex 3.8: not found; affective dialog: conflicting (§11.2): neither
        # is sent. Non-blocking tools by default, scheduling taken [VASYNC][V38MIG]. "Update
        # system instructions and tools during a session with Gemini 3.8 Live" [VSESS].
        "gemini-3.8-live",
        backend="vertex",
        tools_non_blocking=True,
        tool_scheduling=True,
        usage="vertex",
        multi_part=True,
        context_update=True,
        sources="[V38][V38G][V38MIG][VASYNC][VSESS]",
    ),
)
_BY_KEY = {(p.backend, p.model): p for p in PROFILES}
#: Families by name, for models the table does not list.
_FAMILIES: tuple[tuple[BackendName, re.Pattern[str], str], ...] = (
    ("gemini", re.compile(r"^gemini-2\.5-flash-native-audio"), PROFILES[3].model),
    ("gemini", re.compile(r"^gemini-3\.8-live-extended-thinking"), PROFILES[1].model),
    ("gemini", re.compile(r"^gemini-3\.8-live"), PROFILES[0].model),
    ("gemini", re.compile(r"^gemini-3\.1-flash-live"), PROFILES[2].model),
    ("vertex", re.compile(r"^gemini-live-2\.5-flash"), "gemini-live-2.5-flash-native-audio"),
    ("vertex", re.compile(r"^gemini-3\.8-live"), "gemini-3.8-live"),
)


def fallback(model: str, backend: BackendName) -> Profile:
    """A model nothing is known of: nothing optional in its setup; on the Gemini API, text
    and history by the channels that work under every reading (as on 3.1)."""
    if backend == "vertex":  # realtimeInput.text is reported unsupported there [VSAMP]
        return Profile(model, backend="vertex", usage="vertex", multi_part=True)
    return Profile(model, text="realtime_text", history="initial_history", multi_part=True)


def profile_for(model: str, backend: BackendName = "gemini") -> Profile:
    """The profile of `model` (``models/`` and ``publishers/google/models/`` prefixes
    allowed): its row, its family's row under its own name, or `fallback`."""
    name = model.rsplit("/", 1)[-1]
    found = _BY_KEY.get((backend, name))
    if found is not None:
        return found
    for family_backend, pattern, row in _FAMILIES:
        if family_backend == backend and pattern.match(name):
            return replace(_BY_KEY[(backend, row)], model=name)
    return fallback(name, backend)


def known(model: str, backend: BackendName = "gemini") -> bool:
    """Whether the table (or a family in it) describes `model`."""
    name = model.rsplit("/", 1)[-1]
    return (backend, name) in _BY_KEY or any(
        b == backend and p.match(name) for b, p, _ in _FAMILIES
    )


@dataclass(frozen=True)
class ModelSettings:
    """What an operator may ask of the model (per persona), checked against its profile."""

    thinking_level: str | None = None  # minimal | low | medium | high (where supported)
    temperature: float | None = None
    vad_start_sensitivity: str | None = None  # high | low
    vad_end_sensitivity: str | None = None
    vad_prefix_padding_ms: int | None = None
    vad_silence_ms: int | None = None
    barge_in: bool = True  # activityHandling: the caller's speech interrupts the model
    input_transcription: bool = True
    output_transcription: bool = True
    transcription_languages: tuple[str, ...] = ()  # BCP-47 hints for both transcriptions


def problems(profile: Profile, settings: ModelSettings) -> list[tuple[str, str]]:
    """Each setting `profile` does not take: (setting key, why), empty when all fit."""
    found: list[tuple[str, str]] = []
    model = profile.model
    if settings.thinking_level is not None:
        if profile.thinking != "level":
            found.append(("thinking_level", f"{model} takes no thinking level"))
        elif settings.thinking_level.lower() not in profile.thinking_levels:
            levels = ", ".join(profile.thinking_levels)
            found.append(("thinking_level", f"{model} takes one of {levels}"))
    if not settings.input_transcription and profile.input_transcription_always:
        found.append(("input_transcription", f"{model} transcribes the caller always"))
    if not settings.output_transcription and profile.output_transcription_always:
        found.append(("output_transcription", f"{model} transcribes itself always"))
    if settings.transcription_languages and not (
        settings.input_transcription or settings.output_transcription
    ):
        found.append(("transcription_languages", "both transcriptions are off"))
    return found


def setup_fields(profile: Profile, settings: ModelSettings, *, fresh: bool) -> dict[str, Any]:
    """`LiveConnectConfig` fields the profile and the settings add to a setup (`fresh`: a
    new session, not a resumption). Only what the profile takes; `problems` said the rest
    at start."""
    fields: dict[str, Any] = {}
    if profile.thinking == "level" and settings.thinking_level is not None:
        level = types.ThinkingLevel(settings.thinking_level.upper())
        fields["thinking_config"] = types.ThinkingConfig(thinking_level=level)
    if settings.temperature is not None:
        fields["temperature"] = settings.temperature
    detection: dict[str, Any] = {}
    if settings.vad_start_sensitivity is not None:
        name = f"START_SENSITIVITY_{settings.vad_start_sensitivity.upper()}"
        detection["start_of_speech_sensitivity"] = types.StartSensitivity(name)
    if settings.vad_end_sensitivity is not None:
        name = f"END_SENSITIVITY_{settings.vad_end_sensitivity.upper()}"
        detection["end_of_speech_sensitivity"] = types.EndSensitivity(name)
    if settings.vad_prefix_padding_ms is not None:
        detection["prefix_padding_ms"] = settings.vad_prefix_padding_ms
    if settings.vad_silence_ms is not None:
        detection["silence_duration_ms"] = settings.vad_silence_ms
    realtime: dict[str, Any] = {}
    if detection:
        realtime["automatic_activity_detection"] = types.AutomaticActivityDetection(**detection)
    if not settings.barge_in:
        realtime["activity_handling"] = types.ActivityHandling.NO_INTERRUPTION
    if realtime:
        fields["realtime_input_config"] = types.RealtimeInputConfig(**realtime)
    hints = list(settings.transcription_languages) or None
    transcribe = types.AudioTranscriptionConfig(language_codes=hints)
    fields["input_audio_transcription"] = transcribe if settings.input_transcription else None
    fields["output_audio_transcription"] = transcribe if settings.output_transcription else None
    if profile.history == "initial_history" and fresh:
        fields["history_config"] = types.HistoryConfig(initial_history_in_client_content=True)
    return fields


def declare_tools(profile: Profile, tools: tuple[types.Tool, ...]) -> list[types.ToolUnion] | None:
    """The tools with the behavior the profile declares on each function."""
    if not tools:
        return None
    if profile.tool_behavior is None:
        return [*tools]
    behavior = types.Behavior(profile.tool_behavior)
    return [
        tool.model_copy(
            update={
                "function_declarations": [
                    f.model_copy(update={"behavior": behavior})
                    for f in tool.function_declarations or []
                ]
            }
        )
        for tool in tools
    ]
