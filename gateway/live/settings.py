"""The Live session's knobs, each declared once with its default and its check.

The operator sets them (`gateway.config` reads them from flat toml keys and variables:
`replay_limit_s`, `REPLAY_LIMIT_S`), each call's driver (`gateway.live.session`) and its
session machine (`gateway.live.machine`) read this same frozen object, so a knob is added
here, in `config/gateway.toml` and in the configuration docs, nowhere else. What differs
per call (the model, the persona's instruction, voice and tools) is not here but in
`gateway.live.session.LiveOptions`, which carries one of these.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LiveSettings(BaseModel):
    """How each call's Live session talks to the service and how hard it tries to stay
    connected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Sliding-window context compression (always on).
    compression_trigger_tokens: int = Field(default=25600, ge=1000)
    compression_target_tokens: int = Field(default=12800, ge=100)
    replay_limit_s: float = Field(default=60.0, gt=0)  # caller audio kept for replay
    # Resuming after an abrupt reset: give up after this long or this many attempts; retries
    # wait a random time up to `backoff_initial_s`, doubled per attempt, at most `backoff_max_s`.
    reconnect_total_s: float = Field(default=30.0, gt=0)
    reconnect_max_attempts: int = Field(default=12, ge=1)
    backoff_initial_s: float = Field(default=0.1, gt=0)
    backoff_max_s: float = Field(default=2.0, gt=0)
    goaway_margin_s: float = Field(default=1.0, ge=0)  # switch this long before goAway's end
    connect_timeout_s: float = Field(default=10.0, gt=0)
    caller_pause_s: float = Field(default=0.4, gt=0)  # a pause this long is a turn boundary
    resume_nudge_s: float = Field(default=1.5, gt=0)  # prompt a model silent after a reset
    # hold a resumed model's first reply this long at most, to tell a repeat (0: never hold)
    repeat_judge_s: float = Field(default=1.5, ge=0)
    # nothing at all received from a connection this long (no message, no pong): stalled,
    # resumed on a new one; above the service's pong delay (up to 30 s seen) + 5 s
    live_stall_s: float = Field(default=45.0, gt=0)
