"""Settings are declared once: the model holds each check and default, the shipped
`config/gateway.toml` documents the same defaults, and a call's Live options come from the
nested Live settings as they are. The modules import one way."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from gateway.call_factory import live_options
from gateway.config import ConfigError, LiveSettings, Settings, load_settings, required_settings
from gateway.personas import PersonaTable
from gateway.testing.harness import PUBLIC_URL, test_settings
from gateway.twilio.webhooks import stream_url

ROOT = Path(__file__).resolve().parent.parent
TOML = ROOT / "config" / "gateway.toml"
# Required, secret or a table of their own: not a top-level default in the file.
NOT_IN_TOML = {"public_url", "twilio_auth_token", "gemini_api_key", "personas", "live"}
REQUIRED = {"public_url": PUBLIC_URL, "twilio_auth_token": "t", "gemini_api_key": "k"}

pytestmark = pytest.mark.usefixtures("no_config_file")


def documented() -> tuple[dict[str, object], set[str]]:
    """The file's top-level keys, and the keys it shows commented out (`# key = ...`)."""
    text = TOML.read_text()
    commented = {
        line.removeprefix("#").split("=")[0].strip()
        for line in text.splitlines()
        if line.startswith("# ") and "=" in line and line.split("=")[0].strip("# ").isidentifier()
    }
    return tomllib.loads(text), commented


def test_the_toml_documents_every_setting_with_the_models_default() -> None:
    values, commented = documented()
    fields = {**Settings.model_fields, **LiveSettings.model_fields}
    for name, info in fields.items():
        if name in NOT_IN_TOML:
            continue
        if info.default is None:  # off unless set: shown as a commented-out example
            assert name in commented, name
            continue
        assert name in values, f"config/gateway.toml does not document {name}"
        assert values[name] == info.default, (name, values[name], info.default)
    unknown = set(values) - set(fields) - {"personas"}
    assert unknown == set()


def test_a_calls_live_options_carry_the_live_settings_as_they_are() -> None:
    settings = test_settings("k", replay_limit_s=5.0, caller_pause_s=0.2, backoff_max_s=4.0)
    made = live_options(settings, PersonaTable.from_settings(settings).default)
    assert made.settings is settings.live
    assert (made.settings.replay_limit_s, made.settings.caller_pause_s) == (5.0, 0.2)
    assert made.settings.backoff_max_s == 4.0
    assert made.model == settings.gemini_model


def test_live_settings_are_read_from_flat_keys_and_variables_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("replay_limit_s = 9.0\ngoaway_margin_s = 0.5\nreconnect_max_attempts = 3\n")
    monkeypatch.setenv("GATEWAY_CONFIG", str(path))
    monkeypatch.setenv("REPLAY_LIMIT_S", "5")
    monkeypatch.setenv("reconnect_max_attempts", "4")
    settings = load_settings(**REQUIRED, goaway_margin_s=0.25)
    # The environment over the file, a value given in code over both.
    assert settings.live.replay_limit_s == 5.0
    assert settings.live.reconnect_max_attempts == 4
    assert settings.live.goaway_margin_s == 0.25
    assert settings.live.connect_timeout_s == LiveSettings().connect_timeout_s


def test_a_bad_live_setting_is_named_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLAY_LIMIT_S", "-1")
    with pytest.raises(ConfigError) as caught:
        load_settings(**REQUIRED)
    assert str(caught.value).startswith("invalid setting REPLAY_LIMIT_S: ")


def test_every_missing_setting_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PUBLIC_URL", "TWILIO_AUTH_TOKEN", "GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == (
        "missing settings PUBLIC_URL, TWILIO_AUTH_TOKEN, GEMINI_API_KEY or GOOGLE_API_KEY"
    )
    # One missing reads as one; an invalid setting beside it is still named, on the same line.
    monkeypatch.setenv("PORT", "eighty")
    with pytest.raises(ConfigError) as caught:
        load_settings(public_url=PUBLIC_URL, gemini_api_key="k")
    message = str(caught.value)
    assert message.startswith("missing setting TWILIO_AUTH_TOKEN; invalid setting PORT: "), message
    assert "\n" not in message


def test_the_required_settings_are_the_ones_without_a_default() -> None:
    assert required_settings() == [
        "PUBLIC_URL",
        "TWILIO_AUTH_TOKEN",
        "GEMINI_API_KEY or GOOGLE_API_KEY",
    ]
    # Given them, nothing else is needed.
    assert load_settings(**REQUIRED).public_url == PUBLIC_URL


def test_an_http_public_url_is_refused_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twilio opens media streams only over wss://, which the TwiML derives from PUBLIC_URL:
    http:// would start and then never get a stream. A test bed without Twilio may allow it."""
    plain = {**REQUIRED, "public_url": "http://gateway.example.test"}
    with pytest.raises(ConfigError) as caught:
        load_settings(**plain)
    assert str(caught.value) == (
        "invalid setting PUBLIC_URL: must be https:// (Twilio opens media streams only over "
        "wss://); ALLOW_HTTP_PUBLIC_URL=true allows http:// for a test bed without Twilio"
    )
    monkeypatch.setenv("ALLOW_HTTP_PUBLIC_URL", "true")
    settings = load_settings(**plain)
    assert settings.public_url == "http://gateway.example.test"
    assert stream_url(settings.public_url) == "ws://gateway.example.test/twilio/media"
    monkeypatch.setenv("ALLOW_HTTP_PUBLIC_URL", "false")
    assert load_settings(**REQUIRED).public_url == PUBLIC_URL  # https needs no permission


def test_a_config_file_that_cannot_be_read_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mistyped GATEWAY_CONFIG would start on the built-in defaults, the operator's
    personas left out; a malformed file would end in tomllib's traceback. Each is one line."""
    missing = tmp_path / "gateway.tom"
    for named in (missing, tmp_path):
        monkeypatch.setenv("GATEWAY_CONFIG", str(named))
        with pytest.raises(ConfigError) as caught:
            load_settings(**REQUIRED)
        assert str(caught.value) == f"invalid setting GATEWAY_CONFIG: {named} is not a file"
    malformed = tmp_path / "gateway.toml"
    malformed.write_text("max_calls = 50\nport =\n")
    monkeypatch.setenv("GATEWAY_CONFIG", str(malformed))
    with pytest.raises(ConfigError) as caught:
        load_settings(**REQUIRED)
    assert str(caught.value) == f"{malformed}: not valid TOML: Invalid value (at line 2, column 7)"
    malformed.write_text("max_calls = 50\n")
    assert load_settings(**REQUIRED).max_calls == 50
    monkeypatch.setenv("GATEWAY_CONFIG", "")  # empty: no file at all
    assert load_settings(**REQUIRED).max_calls == Settings.model_fields["max_calls"].default


def test_a_secret_left_at_the_examples_placeholder_stops_the_start() -> None:
    """deploy/gateway.env.example's secrets, copied and not filled in: a placeholder auth
    token would start a gateway that refuses every call (signatures checked against it)."""
    unfilled = {
        **REQUIRED,
        "twilio_auth_token": "REPLACE_ME_twilio_auth_token",
        "gemini_api_key": "REPLACE_ME_gemini_api_key",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(**unfilled)
    placeholder = "still the example's placeholder (REPLACE_ME...): set the real one"
    assert str(caught.value) == (
        f"invalid setting TWILIO_AUTH_TOKEN: {placeholder}; "
        f"invalid setting GEMINI_API_KEY or GOOGLE_API_KEY: {placeholder}"
    )


# ---------------------------------------------------------------- imports run one way


def gateway_imports(path: Path) -> set[str]:
    """The gateway modules a file imports (at any depth in the file)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gateway")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gateway"):
            found.add(node.module or "")
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_imports_run_one_way() -> None:
    """call -> twilio / audio / live; nothing but the entry point (and the test bed, which
    starts the app) imports server; personas build on settings, never the reverse; Live
    knows nothing of Twilio and Twilio nothing of Live; the runtime never imports the test
    bed."""
    graph = {module_name(path): gateway_imports(path) for path in (ROOT / "gateway").rglob("*.py")}
    assert len(graph) > 20

    def imports(module: str, prefix: str) -> bool:
        return any(m == prefix or m.startswith(prefix + ".") for m in graph[module])

    for module in graph:
        if module != "gateway.__main__" and not module.startswith("gateway.testing"):
            assert not imports(module, "gateway.server"), module
        if module.startswith("gateway.live"):
            assert not imports(module, "gateway.twilio"), module
            assert not imports(module, "gateway.call"), module
        if module.startswith("gateway.twilio"):
            assert not imports(module, "gateway.live"), module
            assert not imports(module, "gateway.call"), module
            assert not imports(module, "gateway.tools"), module
        if not module.startswith("gateway.testing") and module != "gateway.demo":
            assert not imports(module, "gateway.testing"), module
    assert graph["gateway.config"] == {"gateway.live.settings"}  # the Live knobs' one definition
    assert not imports("gateway.call", "gateway.call_factory")


def test_twilio_knows_nothing_of_gemini() -> None:
    """The Twilio side (protocol, webhooks, TwiML, REST) imports no Google library."""
    for path in (ROOT / "gateway" / "twilio").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "google" for n in names), path
