"""The conversion webhook the CRDs call for v1alpha1: an HTTPS endpoint of the controller.

The API server only calls webhooks over TLS with a CA it is given in the CRD
(``caBundle``). The controller's replicas share one private CA, kept in a
Secret that the first of them creates (nothing to provision beforehand); each
replica signs its own serving certificate with it. The leader writes the CA and
its address into the CRDs' ``spec.conversion``: whichever replica a Service
routes a call to, the API server trusts it.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .conversion import review_response

PATH = "/convert"


@dataclass(frozen=True)
class Authority:
    """The CA every replica's serving certificate is signed by."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def new(cls, days: int = 3650) -> Authority:
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-sandbox-webhook-ca")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
        return cls(
            cert.public_bytes(pem), key.private_bytes(pem, pkcs8, serialization.NoEncryption())
        )


@dataclass
class Certificates:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
            cert.write_bytes(self.cert_pem + self.ca_pem)
            key.write_bytes(self.key_pem)
            key.chmod(0o600)
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


def make_certificates(
    hosts: list[str], authority: Authority | None = None, days: int = 365
) -> Certificates:
    """A certificate for ``hosts`` (DNS names or IP addresses) signed by ``authority`` (a
    fresh CA if None)."""
    authority = authority or Authority.new()
    now = datetime.datetime.now(datetime.UTC)
    ca = x509.load_pem_x509_certificate(authority.cert_pem)
    ca_key = serialization.load_pem_private_key(authority.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Certificates(
        ca_pem=authority.cert_pem,
        cert_pem=cert.public_bytes(pem),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


async def _convert(request: web.Request) -> web.Response:
    return web.json_response(review_response(await request.json()))


async def serve(host: str, port: int, certs: Certificates) -> web.AppRunner:
    """Start the webhook on ``host:port``; the caller cleans the runner up."""
    app = web.Application()
    app.router.add_post(PATH, _convert)
    app.router.add_get("/healthz", lambda _: web.Response(text="ok"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=certs.ssl_context()).start()
    return runner
