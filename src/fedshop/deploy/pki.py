"""Keys and certificates for a deployment, made with `cryptography`.

- A certificate authority and a SuperLink (server) certificate: every connection to the SuperLink is
  TLS, and nodes trust only this CA.
- One SuperNode key pair per silo (EC P-384, OpenSSH format, as Flower expects): the SuperLink admits
  only nodes whose public key was registered with `flwr supernode register`.
- The operator's client certificate: the coordinator's front door (front_door.py) opens its operator
  listener, which forwards Flower's Control API, only to a TLS client that presents it.
- One Ed25519 audit key pair per silo (`make_audit_keys`): the silo signs with it the hash of every
  global model it receives and the hash of its own weights file, for the run's audit log
  (storage/audit.py); the server's audit key is made in its own out-dir when it first runs.

Every file and folder is owner-only from the start (`storage/private_files.py`), the public ones too:
they are copied to whoever needs them, and one rule leaves no private key behind by mistake. The
CA's private key is never written: no certificate is signed after this call.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedshop.storage.audit import write_key_pair
from fedshop.storage.private_files import private_dir, write_private

_PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # give to every SuperNode and to the flwr CLI (--root-certificates)
    certificate: Path  # the SuperLink's
    key: Path  # the SuperLink's private key: stays on the SuperLink host
    # The operator's client certificate and key: whoever holds them may register nodes and submit
    # apps through the operator listener (the only certificate this CA signs for TLS clients).
    operator_certificate: Path | None = None
    operator_key: Path | None = None


def make_tls(folder: Path, hosts: list[str], days: int = 365) -> TlsFiles:
    """A CA and a SuperLink certificate valid for `hosts` (names or IP addresses)."""
    private_dir(folder)
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_name, ca = _make_ca("FedShop deployment CA", now, days)
    key = ec.generate_private_key(ec.SECP384R1())
    names = [_subject_alt_name(host) for host in hosts]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    certificate = (
        _builder(subject, ca_name, key.public_key(), now, days)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    operator = _make_operator(folder, ca_key, ca_name, now, days)
    files = TlsFiles(
        folder / "ca.crt", folder / "superlink.crt", folder / "superlink.key", *operator
    )
    write_private(files.ca, ca.public_bytes(_PEM))
    write_private(files.certificate, certificate.public_bytes(_PEM))
    write_private(
        files.key,
        key.private_bytes(
            _PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
    )
    return files


@dataclass(frozen=True)
class LinkFiles:
    """One party's files for a direct party-to-party link (the vertical PSI's): the link CA's
    certificate and the party's own certificate and key, good for TLS server and client alike."""

    ca: Path
    certificate: Path
    key: Path


def make_link_certs(folder: Path, parties: list[str], hosts: list[str], days: int = 30) -> dict:
    """A CA of its own for the parties' direct link and a certificate per party (both ends of the
    link authenticate: each is a TLS server and client), valid for `hosts`. A CA apart from the
    SuperLink's: a link certificate opens only the link, a SuperLink one only the SuperLink. As in
    `make_tls`, the CA's private key is never written."""
    private_dir(folder)
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_name, ca = _make_ca("FedShop party link CA", now, days)
    write_private(folder / "link-ca.crt", ca.public_bytes(_PEM))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    files = {}
    for party in parties:
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, party)])
        certificate = (
            _builder(subject, ca_name, key.public_key(), now, days)
            .add_extension(
                x509.SubjectAlternativeName([_subject_alt_name(h) for h in hosts]), False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        entry = LinkFiles(folder / "link-ca.crt", folder / f"{party}.crt", folder / f"{party}.key")
        write_private(entry.certificate, certificate.public_bytes(_PEM))
        write_private(
            entry.key,
            key.private_bytes(
                _PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
            ),
        )
        files[party] = entry
    return files


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's (private, public) key files; only the public one leaves the silo."""
    private_dir(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    write_private(
        private,
        key.private_bytes(_PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    write_private(
        public,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
    )
    return private, public


def make_audit_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A silo's (private, public) Ed25519 audit key files, `audit-<name>.key` (PEM) and
    `audit-<name>.pub` (hex; not matched by `silo-*.pub`, the SuperNode keys to register); only the
    public one leaves the silo (the server learns it from the silo's hello and puts it in the log's
    header; anyone may compare the header with the .pub files)."""
    private_dir(folder)
    return write_key_pair(folder, f"audit-{name}")


def _make_operator(folder: Path, ca_key, ca_name: x509.Name, now, days: int) -> tuple[Path, Path]:
    """The operator's client certificate (TLS client use only) and its private key."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedShop operator")])
    certificate = (
        _builder(subject, ca_name, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    certificate_file, key_file = folder / "operator.crt", folder / "operator.key"
    write_private(certificate_file, certificate.public_bytes(_PEM))
    write_private(
        key_file,
        key.private_bytes(
            _PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
    )
    return certificate_file, key_file


def _make_ca(common_name: str, now: dt.datetime, days: int):
    """A self-signed CA (key, name, certificate) that signs end-entity certificates only."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        _builder(name, name, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, name, certificate


def _builder(subject, issuer, public_key, now: dt.datetime, days: int) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _subject_alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
