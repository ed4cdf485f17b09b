"""The key and every model checked with the backend's models API: at start (a refusal stops
`python -m gateway` with one line, exit code 2) and now and then (/readyz fails meanwhile).

The real SDK asks the emulator's models API over TLS; the start is a real subprocess.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from google import genai
from google.genai import errors, types
from test_ops import base_env, samples

from gateway.live.models import (
    BackendRefused,
    Problem,
    Verdict,
    check,
    probe,
    verdict_of_error,
    verdict_of_model,
)
from gateway.testing.harness import (
    AUTH_TOKEN,
    PUBLIC_URL,
    BackendKind,
    free_port,
    quick_emulator,
    test_bed,
)
from gateway.testing.live_emulator import MODELS, RETIRED_MODELS, EmulatorConfig, LiveEmulator
from gateway.testing.tls import TestTLS, make_tls

RETIRED = next(iter(RETIRED_MODELS))
LIVE = [m for m, r in MODELS.items() if "bidiGenerateContent" in r["supportedGenerationMethods"]]


# ------------------------------------------------------------------------ verdicts


def test_a_model_without_bidi_generate_content_cannot_hold_a_live_session() -> None:
    live = types.Model(name="models/m", supported_actions=["bidiGenerateContent"])
    batch = types.Model(name="models/m", supported_actions=["generateContent", "countTokens"])
    silent = types.Model(name="publishers/google/models/m")  # Vertex lists no methods
    assert verdict_of_model(live).ok and verdict_of_model(silent).ok
    verdict = verdict_of_model(batch)
    assert verdict == Verdict("no_live_support", "its methods: generateContent, countTokens")
    assert verdict.definite


@pytest.mark.parametrize(
    ("code", "body", "reason", "definite"),
    [
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "API key not valid. Please pass a valid API key.",
                    "status": "INVALID_ARGUMENT",
                    "details": [{"reason": "API_KEY_INVALID"}],
                }
            },
            "key_refused",
            True,
        ),
        (403, {"error": {"code": 403, "status": "PERMISSION_DENIED"}}, "key_refused", True),
        (404, {"error": {"code": 404, "status": "NOT_FOUND"}}, "model_not_found", True),
        (400, {"error": {"code": 400, "status": "INVALID_ARGUMENT"}}, "refused", True),
        (429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}, "unreachable", False),
        (503, {"error": {"code": 503, "status": "UNAVAILABLE"}}, "unreachable", False),
    ],
)
def test_an_error_says_what_the_backend_refused(
    code: int, body: dict[str, object], reason: str, definite: bool
) -> None:
    kind = errors.ClientError if code < 500 else errors.ServerError
    verdict = verdict_of_error(kind(code, body))
    assert verdict.reason == reason and verdict.definite is definite
    assert verdict.detail.startswith(f"{code} ")


def test_a_network_failure_is_not_a_refusal() -> None:
    verdict = verdict_of_error(ConnectionRefusedError(111, "Connection refused"))
    assert verdict.reason == "unreachable" and not verdict.definite
    assert "ConnectionRefusedError" in verdict.detail


async def test_a_refused_key_is_one_problem_named_by_the_key_setting() -> None:
    refused = Verdict("key_refused", "400 INVALID_ARGUMENT: API key not valid.")

    async def ask(model: str) -> Verdict:
        return refused

    models = {"a": "GEMINI_MODEL", "b": "personas.x.gemini_model"}
    problems = await check(ask, models, "GEMINI_API_KEY")
    assert problems == [Problem("GEMINI_API_KEY", "", refused)]
    assert (
        problems[0].line()
        == "GEMINI_API_KEY: key refused (400 INVALID_ARGUMENT: API key not valid.)"
    )


# -------------------------------------------------------- the SDK against the emulator


@asynccontextmanager
async def emulator(
    config: EmulatorConfig | None = None,
) -> AsyncIterator[tuple[LiveEmulator, TestTLS]]:
    with tempfile.TemporaryDirectory() as tmp:
        tls = make_tls(Path(tmp))
        async with LiveEmulator(config or EmulatorConfig(), tls) as emu:
            yield emu, tls


def client(emu: LiveEmulator, tls: TestTLS, key: str) -> genai.Client:
    options = types.HttpOptions(base_url=emu.base_url)
    return genai.Client(api_key=key, http_options=options)


async def test_the_sdk_reads_the_emulators_models_api(monkeypatch: pytest.MonkeyPatch) -> None:
    async with emulator() as (emu, tls):
        monkeypatch.setenv("SSL_CERT_FILE", tls.ca_pem_path)
        good = client(emu, tls, emu.config.api_key)
        bad = client(emu, tls, "not-the-key")
        try:
            for model in LIVE:
                assert (await probe(good, model)).ok, model
            retired = await probe(good, RETIRED)
            assert retired.reason == "model_not_found"
            assert retired.detail == (
                f"404 NOT_FOUND: models/{RETIRED} is not found for API version v1."
            )
            assert (await probe(good, "gemini-2.5-flash")).reason == "no_live_support"
            refused = await probe(bad, LIVE[0])
            assert refused.reason == "key_refused"
            assert "API key not valid" in refused.detail
            emu.refuse_connections(float("inf"))  # an outage: asked again later
            assert (await probe(good, LIVE[0])).reason == "unreachable"
        finally:
            await good.aio.aclose()
            await bad.aio.aclose()


async def test_the_live_endpoint_refuses_a_retired_model_at_its_setup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with emulator() as (emu, tls):
        monkeypatch.setenv("SSL_CERT_FILE", tls.ca_pem_path)
        good = client(emu, tls, emu.config.api_key)
        try:
            with pytest.raises(errors.APIError) as caught:
                async with good.aio.live.connect(model=RETIRED):
                    pass
            assert caught.value.code == 1008
            assert f"models/{RETIRED} is not found" in str(caught.value)
            async with good.aio.live.connect(model=LIVE[0]):
                pass
        finally:
            await good.aio.aclose()


# ------------------------------------------------------------------ the start itself


async def start_gateway(**env: str) -> tuple[int, list[str]]:
    """`python -m gateway` against an emulator: its exit code (None-free: it must exit or be
    ready within the limit) and its error output's lines."""
    with tempfile.TemporaryDirectory() as tmp:
        tls = make_tls(Path(tmp))
        async with LiveEmulator(EmulatorConfig(), tls) as emu:
            values = {
                "PUBLIC_URL": PUBLIC_URL,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "GEMINI_API_KEY": emu.config.api_key,
                "GOOGLE_GEMINI_BASE_URL": emu.base_url,
                "SSL_CERT_FILE": tls.ca_pem_path,
                "HOST": "127.0.0.1",
                "PORT": str(free_port()),
                "LOG_FORMAT": "console",
                **env,
            }
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                cwd=tmp,
                env=base_env(**values),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                async with asyncio.timeout(60):
                    out, err = await proc.communicate()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert out == b""
            return proc.returncode, err.decode().splitlines()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"GEMINI_MODEL": RETIRED},
            f"gateway: GEMINI_MODEL {RETIRED}: model not found "
            f"(404 NOT_FOUND: models/{RETIRED} is not found for API version v1.)",
        ),
        (
            {"GEMINI_API_KEY": "AIza-not-the-key"},
            "gateway: GEMINI_API_KEY: key refused "
            "(400 INVALID_ARGUMENT: API key not valid. Please pass a valid API key.)",
        ),
        (
            {"GEMINI_MODEL": "gemini-2.5-flash"},
            "gateway: GEMINI_MODEL gemini-2.5-flash: no Live support (its methods: "
            "generateContent, countTokens, createCachedContent, batchGenerateContent)",
        ),
    ],
    ids=["retired-model", "bad-key", "no-live-support"],
)
async def test_a_refused_start_exits_2_with_one_line_naming_the_setting(
    env: dict[str, str], expected: str
) -> None:
    code, lines = await start_gateway(**env)
    assert code == 2
    assert lines[-1] == expected
    # what comes before is the log (console format: level first), never a traceback
    assert all(" INFO " in line or " WARNING " in line for line in lines[:-1]), lines
    assert "AIza-not-the-key" not in "\n".join(lines)


async def test_a_personas_model_is_checked_under_its_own_name(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[personas.sales]\nnumbers = ["+15550100007"]\ngemini_model = "{RETIRED}"\n')
    code, lines = await start_gateway(GATEWAY_CONFIG=str(config))
    assert code == 2
    assert lines[-1].startswith(f"gateway: personas.sales.gemini_model {RETIRED}: model not found")


# ------------------------------------------------------------------------ readiness


async def test_readiness_fails_while_the_backend_refuses_the_key() -> None:
    async with test_bed(quick_emulator(), model_check_interval_s=0.2) as bed:
        url = bed.gateway_url

        async def ready() -> tuple[int, str]:
            async with bed.http.get(url + "/readyz") as response:
                return response.status, await response.text()

        async def until(status: int) -> tuple[int, str]:
            for _ in range(100):  # the check runs every 0.2 s: a few of them at most
                got = await ready()
                if got[0] == status:
                    return got
                await asyncio.sleep(0.05)
            raise AssertionError(f"/readyz never answered {status}")

        async def refusing() -> float:
            async with bed.http.get(url + "/metrics") as response:
                return samples(await response.text())[
                    ("gateway_live_backend_refusing", frozenset())
                ]

        assert await ready() == (200, "ready\n")
        key = bed.emulator.config.api_key
        bed.emulator.config.api_key = "rotated"  # the service stops taking our key
        _, text = await until(503)
        assert text == (
            "live backend refuses: GEMINI_API_KEY: key refused "
            "(400 INVALID_ARGUMENT: API key not valid. Please pass a valid API key.)\n"
        )
        assert await refusing() == 1.0
        bed.emulator.config.api_key = key
        assert await until(200) == (200, "ready\n")
        assert await refusing() == 0.0
        # an outage of the models API is no refusal: readiness holds
        bed.emulator.refuse_connections(float("inf"))
        await asyncio.sleep(0.5)
        assert await ready() == (200, "ready\n")


# ---------------------------------------------------------------------------- Vertex AI


@pytest.mark.parametrize("backend", ["vertex", "vertex_express"])
async def test_on_vertex_a_model_it_does_not_serve_stops_the_start(backend: BackendKind) -> None:
    model = "gemini-3.1-flash-live-preview"  # a Gemini API model; no Vertex id is known
    with pytest.raises(BackendRefused) as caught:
        async with test_bed(quick_emulator(), backend=backend, gemini_model=model):
            pass
    assert str(caught.value).startswith(f"GEMINI_MODEL {model}: model not found (404 NOT_FOUND: ")
    assert f"publishers/google/models/{model}" in str(caught.value)


async def test_on_vertex_readiness_fails_while_the_express_key_is_refused() -> None:
    async with test_bed(
        quick_emulator(), backend="vertex_express", model_check_interval_s=0.2
    ) as bed:
        key = bed.emulator.config.vertex_api_key
        bed.emulator.config.vertex_api_key = "rotated"
        for _ in range(100):
            async with bed.http.get(bed.gateway_url + "/readyz") as response:
                if response.status == 503:
                    text = await response.text()
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("/readyz never failed")
        assert text.startswith("live backend refuses: GEMINI_API_KEY: key refused (400 ")
        bed.emulator.config.vertex_api_key = key
