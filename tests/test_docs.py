"""The README and docs/ stay true to the code: the two setup commands open the README, every
link resolves, every setting, module and metric is documented, and every published benchmark
table names the one command from this repository that reproduces it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import LiveSettings, Settings
from gateway.testing.harness import quick_emulator, test_bed

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_opens_with_the_two_setup_commands() -> None:
    demo, tests = (ROOT / "README.md").read_text().splitlines()[:2]
    setup = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
    assert demo.strip() == setup + ".venv/bin/python -m gateway demo"
    assert tests.strip() == setup + "./scripts/test"
    # CI runs the same test command.
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text().splitlines()


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub gives a page: lower case, punctuation but - and _ dropped,
    spaces as -."""
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if line.startswith("#") and not fenced:
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target}"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: {target}"


def test_every_setting_is_in_the_configuration_doc() -> None:
    text = (DOCS / "configuration.md").read_text()
    names = [*LiveSettings.model_fields, *Settings.model_fields]
    missing = [
        name
        for name in names
        if name not in ("live", "personas")
        and f"`{name.upper()}`" not in text
        and f"`{name}`" not in text
    ]
    assert not missing, f"docs/configuration.md does not document {missing}"


def test_each_benchmark_block_names_a_command_from_this_repository() -> None:
    text = (DOCS / "benchmarks.md").read_text()
    blocks = re.findall(r"<!-- bench:(\w+) begin -->(.*?)<!-- bench:\1 end -->", text, re.S)
    assert {name for name, _ in blocks} == {"main", "deflate", "profile", "replicas"}
    reproduce = text.split("## Reproducing the tables", 1)[1].split("\n## ", 1)[0]
    for name, body in blocks:
        commands = re.findall(r"^command: (.*)$", body, re.M)
        for command in commands:
            # Nothing outside the checkout: no other checkouts, no temporary directories.
            assert "--baseline" not in command and "/tmp" not in command, (name, command)
            assert command.startswith("python -m bench "), (name, command)
            assert f".venv/bin/{command}" in reproduce, f"{name}: {command} is not listed"
        assert commands or name == "profile", name


def test_the_architecture_map_has_a_row_for_every_module() -> None:
    """Every module of the gateway has a row of its own in docs/design.md's module table;
    the test bed's modules are named in its one row."""
    rows = [
        line for line in (DOCS / "design.md").read_text().splitlines() if line.startswith("| `")
    ]
    paths = {p for row in rows for p in re.findall(r"`([\w/.]+)`", row.split("|")[1])}
    testbed = next(row for row in rows if row.startswith("| `gateway/testing/`"))
    missing = []
    for module in sorted((ROOT / "gateway").rglob("*.py")):
        path = str(module.relative_to(ROOT))
        if module.name == "__init__.py":
            continue
        if module.parent.name == "testing":
            if f"`{module.stem}`" not in testbed:
                missing.append(path)
        elif path not in paths:
            missing.append(path)
    assert not missing, f"docs/design.md's module table has no row for {missing}"


async def exported_families() -> dict[str, str]:
    """Each `gateway_*` family the app's /metrics declares, with its type, as Prometheus
    scrapes it (counters with their `_total`)."""
    async with test_bed(quick_emulator()) as bed:
        async with bed.http.get(bed.gateway_url + "/metrics") as resp:
            text = await resp.text()
    declared = dict(re.findall(r"^# TYPE (gateway_\w+) (\w+)$", text, re.M))
    # prometheus_client declares a counter's or histogram's creation time as a gauge of its
    # own (`gateway_calls_created`): part of that family, not one more.
    return {
        name: kind
        for name, kind in declared.items()
        if not (
            name.endswith("_created")
            and {name.removesuffix("_created"), name.replace("_created", "_total")} & set(declared)
        )
    }


def documented_families() -> dict[str, str]:
    """The families docs/operations.md's metrics table lists (a row may name several), with
    the type its row gives."""
    text = (DOCS / "operations.md").read_text()
    table = text.split("| family | type |", 1)[1].split("\n\n", 1)[0]
    found: dict[str, str] = {}
    for row in table.splitlines()[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        for name in re.findall(r"`(gateway_\w+)`", cells[0]):
            assert name not in found, f"{name} has two rows"
            found[name] = cells[1]
    return found


async def test_the_metrics_table_lists_exactly_what_the_app_exports() -> None:
    exported = await exported_families()
    documented = documented_families()
    assert len(exported) > 20, exported  # the app's own families, not a parse that found none
    assert sorted(exported.keys() - documented.keys()) == [], "exported, not in the table"
    assert sorted(documented.keys() - exported.keys()) == [], "in the table, not exported"
    assert {n: t for n, t in documented.items() if exported[n] != t} == {}, "wrong type"
