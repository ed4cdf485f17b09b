"""The Grafana dashboard and the Prometheus alert rules in deploy/ stay true to /metrics.

Both files are parsed as their tools would read them (JSON, YAML), their structure is
checked, and every metric and label their queries name is looked up in what the gateway
exports after a real call (emulator, simulated caller, REST stand-in): a renamed metric
or label fails here before a dashboard goes blank or an alert can never fire.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.testing.harness import AUTH_TOKEN, TestBed, quick_emulator, test_bed
from gateway.testing.twilio_rest import RestRequest, TwilioRestStandIn
from gateway.twilio.rest import TwilioRest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SPEED = 2.0
# Labels Prometheus adds to every series (target labels) or that histograms carry.
TARGET_LABELS = {"instance", "job", "le"}
DURATION = re.compile(r"^\d+[smhdw]$")
_METRIC = re.compile(r"\b(gateway_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(gateway_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"[^\"]*\"\s*(,|$)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def alert_rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query in both files."""
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for rule in alert_rules():
        yield f"alert {rule['alert']}", rule["expr"]


# ------------------------------------------------------------------ structure


def test_the_dashboard_is_grafana_json_every_panel_on_the_datasource_variable() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    (variable,) = board["templating"]["list"]
    assert (variable["type"], variable["name"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 15
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
    for panel in graphs:
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in panel["targets"])
    # What the issue asks the dashboard to show.
    shown = " ".join(expr for _, expr in queries())
    for family in (
        "gateway_calls_active",
        "gateway_calls_total",
        "gateway_live_resumptions_total",
        "gateway_live_reset_gap_seconds_bucket",
        "gateway_caller_audio_dropped_seconds_total",
        "gateway_added_latency_seconds_bucket",
        "gateway_live_errors_total",
        "gateway_live_tokens_total",
    ):
        assert family in shown, family


def test_the_alert_rules_are_a_prometheus_rule_file_for_what_should_wake_someone() -> None:
    loaded = yaml.safe_load(ALERTS.read_text())
    assert set(loaded) == {"groups"}
    names = [g["name"] for g in loaded["groups"]]
    assert len(names) == len(set(names))
    rules = alert_rules()
    alerts = [r["alert"] for r in rules]
    assert len(alerts) == len(set(alerts))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        if "for" in rule:
            assert DURATION.match(rule["for"]), rule["alert"]
    paged = " ".join(r["expr"] for r in rules if r["labels"]["severity"] == "page")
    assert "gateway_live_errors_total" in paged  # Live errors rising
    assert "gateway_caller_audio_dropped_seconds_total" in paged
    assert "gateway_ready" in paged  # readiness failing (not while draining)
    assert "histogram_quantile(0.99" in paged and "gateway_live_reset_gap_seconds" in paged


@pytest.mark.parametrize(("where", "expr"), list(queries()))
def test_every_query_is_balanced_promql(where: str, expr: str) -> None:
    depth = {"(": 0, "[": 0, "{": 0}
    closing = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            assert depth[closing[char]] >= 0, (where, expr)
    assert not any(depth.values()), (where, expr)
    for _, matchers in _SELECTOR.findall(expr):
        assert _MATCHER.sub("", matchers).strip() == "", (where, matchers)


# --------------------------------------------------------------- against /metrics


def unknown_names(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """Metrics and labels `expr` names that /metrics lacks. `exported` maps each series
    name a query can use (`gateway_calls_total`, `..._bucket`, a gauge's own name) to the
    labels seen on it.

    A label is checked against a series only when it has samples (a labelled counter that
    never counted shows no labels); grouping labels must belong to one of the series in
    the expression.
    """
    problems: list[str] = []
    series = _METRIC.findall(expr)
    problems += [f"metric {name}" for name in series if name not in exported]
    for name, matchers in _SELECTOR.findall(expr):
        labels = {m[0] for m in _MATCHER.findall(matchers)}
        seen = exported.get(name)
        if seen:
            problems += [f"label {name}{{{x}}}" for x in sorted(labels - seen - TARGET_LABELS)]
    known = [exported[name] for name in series if name in exported]
    if known and all(known):
        for grouping in _GROUPING.findall(expr):
            for label in (x.strip() for x in grouping.split(",") if x.strip()):
                if label not in set().union(*known) | TARGET_LABELS:
                    problems.append(f"grouping label {label}")
    return problems


def series_names(text: str) -> dict[str, set[str]]:
    """What a PromQL query can select in a /metrics text, with the labels seen on it:
    every family, sampled or not (by its type), and every sample's name."""
    found: dict[str, set[str]] = {}
    names = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "gauge": ("",),
        "summary": ("_count", "_sum", ""),
    }
    for family in text_string_to_metric_families(text):
        for suffix in names.get(family.type, ("",)):
            found.setdefault(family.name + suffix, set())
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(set(sample.labels) - {"le"})
    return found


def test_the_checker_would_catch_a_renamed_metric_or_label() -> None:
    exported = {"gateway_calls_total": {"outcome"}, "gateway_calls_active": set()}
    good = 'sum by (outcome) (rate(gateway_calls_total{outcome="x"}[5m]))'
    assert unknown_names(good, exported) == []
    assert unknown_names("sum(gateway_calls_active)", exported) == []
    assert unknown_names("rate(gateway_calls[5m])", exported) == ["metric gateway_calls"]
    assert unknown_names('rate(gateway_calls_total{cause="x"}[5m])', exported) == [
        "label gateway_calls_total{cause}"
    ]
    assert unknown_names("sum by (cause) (rate(gateway_calls_total[5m]))", exported) == [
        "grouping label cause"
    ]
    text = "# HELP gateway_x_total X\n# TYPE gateway_x_total counter\n"
    assert series_names(text) == {"gateway_x_total": set()}  # a counter that never counted


async def _a_real_call() -> str:
    """One call that exercises what the files show: a greeting, a reply, a goAway switch
    (resets, their gap), usage, and end_call through the REST stand-in (a hang-up)."""
    config = quick_emulator(
        SPEED, lifetime=4.0, goaway_lead=1.5, tool_call_on_text={"key 9": ("end_call", {})}
    )
    personas = {
        "desk": {
            "numbers": ["+15550100011"],
            "system_instruction": "You answer the desk.",
            "greeting": "Greet the caller.",
            "tools": ["end_call"],
        }
    }
    beds: list[TestBed] = []
    ended: list[asyncio.Task[None]] = []

    async def twilio_ends_stream(request: RestRequest) -> None:
        call = beds[0].placed_call(request.call_sid) if beds else None
        if call is not None and request.form.get("Status") == "completed":
            ended.append(asyncio.create_task(call.hangup()))

    async with TwilioRestStandIn(AUTH_TOKEN) as rest:
        rest.on_request = twilio_ends_stream
        client = TwilioRest(AUTH_TOKEN, http_client=rest.http_client())
        try:
            async with test_bed(
                config, personas=personas, rest=client, token_prices={"prompt_audio": 3.0}
            ) as bed:
                beds.append(bed)
                call = await bed.caller(speed=SPEED).place_call(to="+15550100011")
                while not any(
                    kind == "setup" and "resumed=True" in detail
                    for _, kind, detail in bed.emulator.record.events
                ):
                    assert not call.closed
                    await call.silence(0.2)
                await call.speak_tone(400.0, 0.5)
                await call.silence(1.0)
                await call.send_dtmf("9")
                while not call.closed:
                    await call.silence(0.1)
                await asyncio.gather(*ended)
                while True:
                    if not bed.metrics.registry.get_sample_value("gateway_calls_active"):
                        break
                    await asyncio.sleep(0.05)
                async with bed.http.get(bed.gateway_url + "/metrics") as resp:
                    return await resp.text()
        finally:
            await client.close()


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    return series_names(asyncio.run(asyncio.wait_for(_a_real_call(), 60)))


def test_the_real_call_exercised_what_the_files_show(exported: dict[str, set[str]]) -> None:
    for series, labels in {
        "gateway_calls_total": {"outcome"},
        "gateway_live_resumptions_total": {"cause"},
        "gateway_live_reset_gap_seconds_bucket": {"cause"},
        "gateway_live_tokens_total": {"persona", "kind", "modality"},
        "gateway_live_cost_usd_total": {"persona"},
        "gateway_hangups_total": {"persona", "reason"},
        "gateway_added_latency_seconds_bucket": {"direction"},
        "gateway_ready": set(),
    }.items():
        assert exported.get(series) == labels, series


@pytest.mark.parametrize(("where", "expr"), list(queries()))
def test_every_metric_and_label_a_query_names_is_exported(
    exported: dict[str, set[str]], where: str, expr: str
) -> None:
    assert _METRIC.search(expr), (where, "names no gateway metric")
    assert unknown_names(expr, exported) == [], (where, expr)
