"""Throw-away TLS material for tests: a private CA and a server certificate for loopback.

The google-genai SDK only speaks ``wss://`` to an ``https://`` base URL and verifies the
server against ``SSL_CERT_FILE`` (read when the ``genai.Client`` is created), so the
emulator has to present a certificate the client trusts. The CA is written to a PEM file
so that environment variable can point at it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class TestTLS:
    """Server and client contexts sharing one private CA."""

    __test__ = False  # not a pytest test class, despite the name

    ca_pem_path: str
    server_ssl: ssl.SSLContext
    client_ssl: ssl.SSLContext


def make_tls(directory: Path) -> TestTLS:
    """Create a CA and a leaf for 127.0.0.1/localhost; write the CA to ``directory/ca.pem``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost", "::1")
    ca_path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))

    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server_ssl)
    client_ssl = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_path))
    return TestTLS(ca_pem_path=str(ca_path), server_ssl=server_ssl, client_ssl=client_ssl)
