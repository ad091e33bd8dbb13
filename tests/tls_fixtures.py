"""TLS material for test_tls.py, made fresh by trustme for each test: no key or certificate is checked in.

- tls: a TLSMaterial under tmp_path with two CAs, one for servers (the relay,
  back-ends) and one for client certificates, PEM files for each, and the
  certificates most tests need: `server` (the relay's: mx.test, localhost,
  127.0.0.1), `backend` (127.0.0.1, localhost) and `client` (client.example,
  issued by the client CA, with a comma in its organization so that the
  RFC 2253 escaping shows). issue() makes more, expired ones included.
- TLSMaterial.client_context() and server_context() build ssl contexts from them.
- handshake_in_memory() runs a handshake between two contexts without sockets:
  it tells what the local OpenSSL can do at all (TLS 1.1 under OpenSSL 3).
"""
import datetime
import hashlib
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding


@dataclass
class Certificate:
    """A trustme leaf and the PEM files it was written to: the chain at cert_path, its key at key_path."""
    leaf: trustme.LeafCert
    cert_path: Path
    key_path: Path

    @property
    def x509(self):
        return x509.load_pem_x509_certificate(self.leaf.cert_chain_pems[0].bytes())

    @property
    def serial(self):
        return self.x509.serial_number

    @property
    def subject(self):
        """RFC 4514 (= RFC 2253) text, most specific part first: what nginx sends as Auth-SSL-Subject."""
        return self.x509.subject.rfc4514_string()

    @property
    def issuer(self):
        return self.x509.issuer.rfc4514_string()

    @property
    def fingerprint(self):
        """SHA-1 of the DER form, lower-case hex."""
        return hashlib.sha1(self.x509.public_bytes(Encoding.DER)).hexdigest()

    def copy_to(self, cert_path, key_path):
        """Write this certificate and key over other files (a certificate renewed in place)."""
        shutil.copyfile(self.cert_path, cert_path)
        shutil.copyfile(self.key_path, key_path)


def serial_of(der):
    """The serial number of a DER certificate, as getpeercert(binary_form=True) gives it."""
    return x509.load_der_x509_certificate(der).serial_number


class TLSMaterial:
    """CAs and certificates written under `directory`; see the module docstring."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.ca = trustme.CA(organization_name="smtprelay tests server CA")
        self.ca_path = self.directory / "server-ca.pem"
        self.ca.cert_pem.write_to_path(self.ca_path)
        self.client_ca = trustme.CA(organization_name="smtprelay tests client CA")
        self.client_ca_path = self.directory / "client-ca.pem"
        self.client_ca.cert_pem.write_to_path(self.client_ca_path)
        self.server = self.issue("server", "mx.test", "localhost", "127.0.0.1")
        self.backend = self.issue("backend", "127.0.0.1", "localhost")
        self.client = self.issue("client", "client.example", ca=self.client_ca, common_name="client.example",
                                 organization_name="Example, Inc.")

    def issue(self, name, *identities, ca=None, expired=False, **kwargs):
        """A new certificate from `ca` (default the server CA) in NAME.crt and NAME.key."""
        if expired:
            now = datetime.datetime.now(datetime.timezone.utc)
            kwargs.update(not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
        leaf = (ca or self.ca).issue_cert(*identities, **kwargs)
        certificate = Certificate(leaf, self.directory / f"{name}.crt", self.directory / f"{name}.key")
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(certificate.cert_path, append=True)
        leaf.private_key_pem.write_to_path(certificate.key_path)
        return certificate

    def client_context(self, certificate=None, trust=None):
        """A client context trusting `trust` (default the server CA), presenting `certificate` if given."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # names and certificates checked
        (trust or self.ca).configure_trust(context)
        if certificate:
            certificate.leaf.configure_cert(context)
        return context

    @staticmethod
    def server_context(certificate):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        certificate.leaf.configure_cert(context)
        return context


@pytest.fixture
def tls(tmp_path):
    directory = tmp_path / "tls"
    directory.mkdir()
    return TLSMaterial(directory)


def handshake_in_memory(client_context, server_context):
    """Run a handshake between two contexts over memory BIOs -> the version agreed, or None if it failed."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, to_server, server_hostname=None)
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = {client: False, server: False}
    for _ in range(10):
        for end in (client, server):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return None
        server_in.write(to_server.read())
        to_client.write(server_out.read())
        if all(done.values()):
            return client.version()
    return None
