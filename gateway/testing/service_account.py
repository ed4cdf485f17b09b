"""A throw-away Google service account for tests: a key file whose `token_uri` is the
emulator's, so google-auth does the real token exchange (a signed JWT assertion) with it.

The key pair is made here, the private half written into the file as Google issues it
(`type: service_account`), the public half registered with the emulator, which checks the
assertion's signature against it (`gateway.testing.live_emulator.VertexService`).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.testing.live_emulator import LiveEmulator


def service_account_file(
    directory: Path, emulator: LiveEmulator, project: str, name: str = "gateway-test"
) -> Path:
    """Write `directory/service-account.json` for a new account the emulator accepts."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    email = f"{name}@{project}.iam.gserviceaccount.com"
    emulator.vertex.register_service_account(email, public_pem)
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": secrets.token_hex(20),
        "private_key": private_pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": emulator.vertex.token_uri,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "service-account.json"
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return path
