"""Is the backend willing to serve us? The key and every model checked with its models API.

A retired model (`gemini-live-2.5-flash-preview`, shut down 2025-12-09), a refused key or a
model that cannot hold a Live session fail every call at its first setup; the Live endpoint
only says so by closing the socket. The backend's own models API (the SDK's
``client.aio.models.get``) says it before any call: the gateway asks at start, where a
definite refusal stops it, and again now and then, while ``/readyz`` fails with the reason.

A verdict is pure (`verdict_of_model`, `verdict_of_error`); `check` asks the service;
`BackendWatch` keeps the last answer and asks again at an interval. What a setting is called
(`GEMINI_MODEL`, `personas.sales.gemini_model`, `GEMINI_API_KEY`) is the caller's to say:
this module knows models and keys, not the configuration.

Gemini API: ``GET /{version}/models/{id}`` with ``x-goog-api-key``; a model resource's
``supportedGenerationMethods`` (the SDK's ``Model.supported_actions``) lists
``bidiGenerateContent`` for a Live model. A refused key is ``400 INVALID_ARGUMENT`` with reason
``API_KEY_INVALID`` (401/403 for other identity failures), an unknown or retired model
``404 NOT_FOUND``. Vertex AI's model resource carries no methods: a model it knows is taken
as it is (the session's setup still says the rest).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from google import genai
from google.genai import errors, types

log = logging.getLogger(__name__)

#: The generation method a Live model lists (``supportedGenerationMethods``).
LIVE_METHOD = "bidiGenerateContent"
#: One models API request: long enough for a slow answer, short enough for a probe.
PROBE_TIMEOUT_S = 10.0

Reason = Literal[
    "ok", "key_refused", "model_not_found", "no_live_support", "refused", "unreachable"
]
#: What each reason says in a line.
SAYS: Mapping[Reason, str] = {
    "ok": "ok",
    "key_refused": "key refused",
    "model_not_found": "model not found",
    "no_live_support": "no Live support",
    "refused": "refused",
    "unreachable": "could not be checked",
}


@dataclass(frozen=True)
class Verdict:
    """What the backend said about one model (and the key it was asked with)."""

    reason: Reason
    detail: str = ""  # what the service said, in one line

    @property
    def ok(self) -> bool:
        return self.reason == "ok"

    @property
    def definite(self) -> bool:
        """A refusal that asking again will not change (a transient failure is not)."""
        return self.reason not in ("ok", "unreachable")

    @property
    def about_key(self) -> bool:
        return self.reason == "key_refused"


@dataclass(frozen=True)
class Problem:
    """A verdict with the setting it concerns: the line an operator reads."""

    setting: str
    value: str  # the model, or "" for the key
    verdict: Verdict

    def line(self) -> str:
        """``GEMINI_MODEL gemini-live-2.5-flash-preview: model not found (404 NOT_FOUND: ...)``"""
        head = f"{self.setting} {self.value}" if self.value else self.setting
        says = SAYS[self.verdict.reason]
        return (
            f"{head}: {says} ({self.verdict.detail})" if self.verdict.detail else f"{head}: {says}"
        )


class BackendRefused(Exception):
    """The backend definitely refuses the key or a model: the start stops with this line."""


def verdict_of_model(model: types.Model) -> Verdict:
    """A model the service knows: ok if it can hold a Live session, or says nothing of it."""
    actions = model.supported_actions
    if actions is None or LIVE_METHOD in actions:
        return Verdict("ok")
    return Verdict("no_live_support", f"its methods: {', '.join(actions) or 'none'}")


def verdict_of_error(exc: BaseException) -> Verdict:
    """What an exception out of ``models.get`` says: a refusal, or the service not reached."""
    if isinstance(exc, errors.ClientError):
        detail = _said(exc)
        code = exc.code
        if code in (401, 403) or (code == 400 and "API_KEY" in str(exc.details)):
            return Verdict("key_refused", detail)
        if code == 404:
            return Verdict("model_not_found", detail)
        if code in (408, 429):  # a timeout, a quota: asking later may succeed
            return Verdict("unreachable", detail)
        return Verdict("refused", detail)
    if isinstance(exc, errors.APIError):  # 5xx
        return Verdict("unreachable", _said(exc))
    return Verdict("unreachable", f"{type(exc).__name__}: {exc}".rstrip(": "))


def _said(exc: errors.APIError) -> str:
    message = " ".join(str(exc.message or "").split())
    return f"{exc.code} {exc.status}: {message}" if message else f"{exc.code} {exc.status}"


async def probe(client: genai.Client, model: str, timeout_s: float = PROBE_TIMEOUT_S) -> Verdict:
    """Ask the backend's models API about `model` once (no retries: the caller asks again)."""
    options = types.HttpOptions(
        timeout=int(timeout_s * 1000), retry_options=types.HttpRetryOptions(attempts=1)
    )
    try:
        async with asyncio.timeout(timeout_s + 1.0):
            found = await client.aio.models.get(
                model=model, config=types.GetModelConfig(http_options=options)
            )
    except Exception as exc:  # the SDK's HTTP client (aiohttp, httpx2) has its own errors:
        return verdict_of_error(exc)  # anything but an APIError is "not reached", said as is
    return verdict_of_model(found)


Probe = Callable[[str], Awaitable[Verdict]]


async def check(ask: Probe, models: Mapping[str, str], key_setting: str) -> list[Problem]:
    """Every model asked at once; `models` maps each model to the setting that names it.

    A refused key is one problem (named by `key_setting`), not one per model.
    """
    names = list(models)
    verdicts = await asyncio.gather(*(ask(m) for m in names))
    problems: list[Problem] = []
    for model, verdict in zip(names, verdicts, strict=True):
        if verdict.about_key:
            return [Problem(key_setting, "", verdict)]
        if not verdict.ok:
            problems.append(Problem(models[model], model, verdict))
    return problems


def summary(problems: list[Problem]) -> str:
    """All problems in one line."""
    return "; ".join(p.line() for p in problems)


class BackendWatch:
    """The backend's last answer about the key and the models, asked again every interval.

    `start` asks once: a definite refusal raises `BackendRefused` (the start stops); a
    service not reached is logged and asked again later, the gateway serving meanwhile
    (the Live endpoint may well work). `refusal` is the line `/readyz` fails with while the
    backend refuses us; None while it does not.
    """

    def __init__(
        self,
        ask: Probe,
        models: Mapping[str, str],
        key_setting: str,
        interval_s: float,
        on_result: Callable[[Reason], None] = lambda reason: None,
    ) -> None:
        self._ask = ask
        self._models = dict(models)
        self._key_setting = key_setting
        self._interval_s = interval_s
        self._on_result = on_result
        self.refusal: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def check_once(self) -> list[Problem]:
        """Ask now; `refusal` follows definite refusals (a service not reached keeps it)."""
        problems = await check(self._ask, self._models, self._key_setting)
        for problem in problems or [Problem("", "", Verdict("ok"))]:
            self._on_result(problem.verdict.reason)
        definite = [p for p in problems if p.verdict.definite]
        unreached = [p for p in problems if not p.verdict.definite]
        if definite:
            line = summary(definite)
            if line != self.refusal:
                log.error("live backend refuses us: %s", line)
            self.refusal = line
        elif not unreached and self.refusal is not None:
            log.info("live backend accepts the key and every model again")
            self.refusal = None
        if unreached:
            log.warning(
                "live backend: %s; asking again in %g s", summary(unreached), self._interval_s
            )
        return problems

    async def start(self) -> None:
        """The check at start (a definite refusal raises, unlogged: the caller says it), then
        the periodic one in the background."""
        problems = await check(self._ask, self._models, self._key_setting)
        definite = [p for p in problems if p.verdict.definite]
        if definite:
            raise BackendRefused(summary(definite))
        for problem in problems or [Problem("", "", Verdict("ok"))]:
            self._on_result(problem.verdict.reason)
        if problems:
            log.warning(
                "live backend: %s; serving, asking again in %g s",
                summary(problems),
                self._interval_s,
            )
        self._task = asyncio.create_task(self._loop(), name="backend-watch")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check_once()
            except Exception:  # a bug here must not end the watch: readiness would freeze
                log.exception("live backend check failed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
