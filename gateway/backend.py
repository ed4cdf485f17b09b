"""Which Live backend the gateway talks to, and the google-genai client for it.

Chosen by the SDK's own settings (`gateway.config`): the Gemini API with a key, or Vertex AI
(`GOOGLE_GENAI_USE_VERTEXAI=true`) with a project, a location and Application Default
Credentials (a service-account file named by `GOOGLE_APPLICATION_CREDENTIALS`, workload
identity, gcloud's login), or a Vertex express-mode key when no project is set. Everything
is resolved and checked once at start (`resolve`), so a missing credential or a model the
location does not serve stops the start with one line instead of failing every call.

The client gets project, location and credentials explicitly: given a custom base URL
(`GOOGLE_VERTEX_BASE_URL`, as tests and proxies set it) the SDK otherwise drops a project
and location read from the environment, takes the URL for an API gateway and sends no
token. It is also told `vertexai=True` itself, because the SDK picks
`GOOGLE_VERTEX_BASE_URL` over `GOOGLE_GEMINI_BASE_URL` only when told so (not when it reads
the backend from the environment).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import google.auth
from google import genai
from google.auth.credentials import Credentials
from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError
from google.genai import types

from gateway.config import ConfigError, Settings

#: The scope the SDK asks for its Vertex AI token.
VERTEX_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
#: The location the SDK uses when none is set (also the express-mode endpoint).
DEFAULT_LOCATION = "global"
#: Vertex Live models served only in regions, not in `global`: "Gemini Live API 2.5 models
#: are not available in global" (Firebase AI Logic's locations page; live-models.md §5).
_REGIONAL_ONLY = re.compile(r"(^|-)2\.5-")


@dataclass(frozen=True)
class Backend:
    """The Live service and who the gateway is to it."""

    vertex: bool
    api_key: str | None = None  # Gemini API key, or Vertex express-mode key
    project: str | None = None  # Vertex with credentials (None in express mode)
    location: str | None = None
    credentials: Credentials | None = None

    def describe(self) -> str:
        """For the start's log line (no secrets)."""
        if not self.vertex:
            return "Gemini API (key)"
        if self.project is None:
            return f"Vertex AI express mode (key, location {self.location or DEFAULT_LOCATION})"
        kind = type(self.credentials).__module__ + "." + type(self.credentials).__name__
        return f"Vertex AI (project {self.project}, location {self.location}, {kind})"

    def client(self, http_options: types.HttpOptions) -> genai.Client:
        """A google-genai client for this backend (the caller closes it)."""
        if not self.vertex:
            return genai.Client(api_key=self.api_key, http_options=http_options)
        if self.project is None:  # express mode: the key; a location only if one was set
            return genai.Client(
                vertexai=True,
                api_key=self.api_key,
                location=self.location,
                http_options=http_options,
            )
        return genai.Client(
            vertexai=True,
            project=self.project,
            location=self.location,
            credentials=self.credentials,
            http_options=http_options,
        )


def resolve(settings: Settings, models: tuple[str, ...]) -> Backend:
    """The backend the settings name, its credentials loaded and `models` checked against its
    location; ConfigError (one line naming the setting) for what cannot work.

    Blocking: reading Application Default Credentials may ask the metadata server.
    """
    key = settings.gemini_api_key.get_secret_value() if settings.gemini_api_key else None
    if not settings.vertexai:
        if not key:
            raise ConfigError("missing setting GEMINI_API_KEY")
        return Backend(vertex=False, api_key=key)
    location = settings.google_cloud_location or None
    for model in models:
        problem = region_problem(model, location or DEFAULT_LOCATION)
        if problem:
            raise ConfigError(problem)
    if not settings.google_cloud_project and key:
        return Backend(vertex=True, api_key=key, location=location)
    credentials, found_project = _default_credentials()
    project = settings.google_cloud_project or found_project
    if not project:
        raise ConfigError(
            "missing setting GOOGLE_CLOUD_PROJECT (Vertex AI: the credentials name no project)"
        )
    return Backend(
        vertex=True,
        project=project,
        location=location or DEFAULT_LOCATION,
        credentials=credentials,
    )


def _default_credentials() -> tuple[Credentials, str | None]:
    try:
        found: tuple[Any, Any] = google.auth.default(scopes=list(VERTEX_SCOPES))  # type: ignore[no-untyped-call]
    except DefaultCredentialsError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            "Vertex AI: no Application Default Credentials (set GOOGLE_APPLICATION_CREDENTIALS "
            f"to a service-account key file, or run with workload identity): {first}"
        ) from None
    except (GoogleAuthError, ValueError, OSError) as exc:
        raise ConfigError(
            f"Vertex AI: the Application Default Credentials do not load: {exc}"
        ) from None
    credentials, project = found
    return credentials, project or None


def region_problem(model: str, location: str) -> str | None:
    """Why Vertex AI's `location` cannot serve `model` (None if nothing known speaks
    against it)."""
    name = model.rsplit("/", 1)[-1]
    if location == DEFAULT_LOCATION and _REGIONAL_ONLY.search(name):
        return (
            f"invalid setting GOOGLE_CLOUD_LOCATION: {name} is served on Vertex AI only in "
            "regions, not in global (set a region such as us-central1)"
        )
    return None
