"""Private set intersection (secure/psi.py): real protocols, real sockets on 127.0.0.1.

Each spu session runs both parties in this process, a thread each, over spu's brpc link; the bytes
either party receives are captured by a relay between them and searched for what it must not learn.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedshop.errors import FedShopError
from fedshop.secure import psi, psi_openmined, psi_spu
from fedshop.secure.psi import (
    PROTOCOLS,
    PsiTls,
    encode_id,
    prepare_ids,
    psi_available,
    require_backend,
    run_psi_party,
)


def installed(protocol: str):
    """The protocol as a test parameter, skipped (with how to install it) when its library is
    missing; CI installs both."""
    reason = ""
    if not psi_available(protocol):
        try:
            require_backend(protocol)
        except FedShopError as error:
            reason = str(error)
    return pytest.param(protocol, marks=pytest.mark.skipif(bool(reason), reason=reason))


def local_psi(*args, **options):
    """`psi.local_psi` with a short timeout: a stuck session fails the test within a minute or
    two, saying where, instead of hanging the suite."""
    return psi.local_psi(*args, **{"timeout": 20.0, **options})


ALL = [installed(p) for p in PROTOCOLS]
SPU = [installed(p) for p in ("rr22", "kkrt", "ecdh")]


def ids(prefix: str, numbers) -> list[str]:
    return [f"{prefix}{n:05d}" for n in numbers]


@pytest.mark.parametrize("protocol", ALL)
@pytest.mark.parametrize(
    ("label", "feature"),
    [
        (range(0, 300), range(150, 400)),  # half
        (range(0, 200), range(200, 350)),  # none
        (range(0, 250), range(0, 250)),  # all: the same set
        (range(0, 40), range(0, 300)),  # one set inside the other
    ],
    ids=["overlap", "disjoint", "identical", "subset"],
)
def test_intersection_is_exact(protocol, label, feature):
    label_ids, feature_ids = ids("c", label), ids("c", feature)
    expected = sorted(set(label_ids) & set(feature_ids))
    ours, theirs = local_psi(label_ids, feature_ids, protocol, reveal_to="both")
    assert ours.intersection == expected
    assert theirs.intersection == expected
    assert ours.intersection_size == theirs.intersection_size == len(expected)
    assert (ours.own_size, ours.peer_size) == (len(label_ids), len(feature_ids))
    assert (theirs.own_size, theirs.peer_size) == (len(feature_ids), len(label_ids))
    assert ours.bytes_sent == theirs.bytes_received > 0
    assert ours.bytes_received == theirs.bytes_sent > 0


@pytest.mark.parametrize("protocol", ALL)
def test_reveal_to_label_leaves_the_feature_holder_without_the_intersection(protocol):
    label_ids, feature_ids = ids("c", range(100)), ids("c", range(50, 180))
    ours, theirs = local_psi(label_ids, feature_ids, protocol, reveal_to="label")
    assert ours.intersection == ids("c", range(50, 100))
    assert theirs.intersection is None and theirs.intersection_size is None
    assert theirs.peer_size == 100  # what it does learn: the label holder's set size


def encodings(customer_id: str) -> list[bytes]:
    """Every form in which an id could leak: plain, SHA-256 (hex and raw), FedShop's encoding."""
    plain = customer_id.encode()
    digest = hashlib.sha256(plain)
    key = encode_id(customer_id)
    raw_key = base64.urlsafe_b64decode(key)
    return [plain, digest.digest(), digest.hexdigest().encode(), key.encode(), raw_key]


@pytest.mark.parametrize("reveal_to", ["both", "label"])
@pytest.mark.parametrize("protocol", ALL)
def test_non_members_are_not_revealed(protocol, reveal_to):
    shared = ids("shared-customer-", range(60))
    label_only = ids("platform-only-customer-", range(90))
    feature_only = ids("partner-only-customer-", range(70))
    ours, theirs = local_psi(
        shared + label_only, feature_only + shared, protocol, reveal_to=reveal_to, capture=True
    )
    assert ours.intersection == sorted(shared)
    assert theirs.intersection == (sorted(shared) if reveal_to == "both" else None)
    # What each party received over the wire holds none of the other's non-members, in any form.
    assert len(ours.received_wire) == ours.bytes_received > 0  # all of it, as counted
    assert len(theirs.received_wire) == theirs.bytes_received > 0
    for customer in feature_only:
        assert not any(form in ours.received_wire for form in encodings(customer)), customer
    for customer in label_only:
        assert not any(form in theirs.received_wire for form in encodings(customer)), customer
    # Control: the search finds an id where one is sent in the clear (under the openmined backend
    # the result travels to the feature holder as FedShop's encodings; spu sends none in the clear).
    if protocol == "openmined" and reveal_to == "both":
        assert encode_id(shared[0]).encode() in theirs.received_wire


@pytest.mark.parametrize("protocol", SPU)
def test_awkward_ids_survive_the_csv_files(protocol):
    awkward = ["a,b", 'say "hi"', "line\nbreak", "tab\there", " padded ", "ünï©ødé", "NULL", "id"]
    ours, theirs = local_psi(
        [*awkward, "only-label", 7], [*awkward[::-1], "only-feature", "7"], protocol
    )
    assert ours.intersection == theirs.intersection == sorted([*awkward, "7"])


def test_inputs_are_checked():
    with pytest.raises(FedShopError, match="empty"):
        prepare_ids([])
    with pytest.raises(FedShopError, match="single string"):
        prepare_ids("c1")
    with pytest.raises(FedShopError, match="empty strings"):
        prepare_ids(["c1", ""])
    for bad in (1.0, None, b"c1", True):
        with pytest.raises(FedShopError, match="strings or integers"):
            prepare_ids(["c1", bad])
    prepared = prepare_ids(["c1", "c2", "c1", 3, np.int64(3), "3"])
    assert prepared.duplicates == 3 and sorted(prepared.ids_of.values()) == ["3", "c1", "c2"]
    with pytest.raises(FedShopError, match="protocol"):
        local_psi(["a"], ["a"], protocol="rsa")
    with pytest.raises(FedShopError, match="reveal_to"):
        local_psi(["a"], ["a"], reveal_to="feature")
    with pytest.raises(FedShopError, match="role"):
        run_psi_party("server", ["a"], self_address="127.0.0.1:1", peer_address="127.0.0.1:2")


@pytest.mark.parametrize("protocol", [installed("rr22")])
def test_duplicates_are_dropped_and_counted(protocol):
    ours, theirs = local_psi(["a", "b", "a", "a"], ["b", "c", "c"], protocol)
    assert ours.intersection == ["b"] and (ours.duplicates, theirs.duplicates) == (2, 1)
    assert (ours.own_size, ours.peer_size) == (2, 2)


def test_missing_backends_say_how_to_install(monkeypatch):
    monkeypatch.setattr(psi_spu, "spu_folder", lambda: None)
    assert not psi_available("rr22")
    with pytest.raises(FedShopError, match=r"pip install --no-deps spu==0\.9\.5"):
        local_psi(["a"], ["a"], "rr22")
    monkeypatch.setitem(sys.modules, "private_set_intersection.python", None)
    assert not psi_available("openmined")
    with pytest.raises(FedShopError, match=r"pip install --no-deps openmined-psi==2\.0\.6"):
        local_psi(["a"], ["a"], "openmined")


@pytest.mark.parametrize("protocol", [installed("openmined")])
def test_openmined_messages_are_bytes_and_checked(protocol):
    label = psi_openmined.OpenminedLabel(["k1", "k2", "k3"])
    feature = psi_openmined.OpenminedFeature(["k2", "k3", "k4", "k5"])
    request = label.request()
    reply = feature.reply(request)
    assert isinstance(request, bytes) and isinstance(reply, bytes)
    assert label.intersection(reply) == ["k2", "k3"]
    assert (label.peer_size, feature.peer_size) == (4, 3)
    assert feature.accept(label.result()) == ["k2", "k3"]
    with pytest.raises(FedShopError, match="does not hold"):
        feature.accept(b"k2\nk9")
    with pytest.raises(FedShopError, match=r"truncated|malformed|trailing"):
        label.intersection(reply[:-5])
    with pytest.raises(FedShopError, match="openmined"):
        run_psi_party("label", ["a"], protocol="openmined", self_address="a:1", peer_address="b:2")


# ---- the link: who may take part ----


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _authority(common_name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _party_tls(folder: Path, authority, name: str) -> PsiTls:
    """A certificate for TLS server and client use (each party is both), signed by `authority`."""
    ca_key, ca = authority
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = PsiTls(folder / f"{name}-ca.pem", folder / f"{name}.pem", folder / f"{name}.key")
    paths.ca.write_bytes(ca.public_bytes(pem))
    paths.certificate.write_bytes(certificate.public_bytes(pem))
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    paths.key.write_bytes(key_pem)
    paths.key.chmod(0o600)
    return paths


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("psi-tls")
    shared, rogue = _authority("label and feature holders' CA"), _authority("someone else's CA")
    return {
        "label": _party_tls(folder, shared, "label"),
        "feature": _party_tls(folder, shared, "feature"),
        "rogue": _party_tls(folder, rogue, "rogue"),
    }


def run_both(label_tls, feature_tls, timeout: float = 3.0, measure: bool = False) -> dict:
    """Each party's own run_psi_party (a thread each, directly connected): its result or error."""
    from fedshop.secure.psi import _free_ports

    ports = _free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    outcome = {}

    def party(rank, role, party_ids, tls):
        try:
            outcome[role] = run_psi_party(
                role,
                party_ids,
                self_address=addresses[rank],
                peer_address=addresses[1 - rank],
                tls=tls,
                timeout=timeout,
                measure_bytes=measure and role == "label",
            )
        except FedShopError as error:
            outcome[role] = error

    threads = [
        threading.Thread(target=party, args=(0, "label", ids("c", range(50)), label_tls)),
        threading.Thread(target=party, args=(1, "feature", ids("c", range(25, 80)), feature_tls)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcome


@pytest.mark.parametrize("protocol", [installed("rr22")])
def test_tls_between_certified_parties_works(protocol, tls_files):
    ours, theirs = local_psi(
        ids("c", range(50)),
        ids("c", range(25, 80)),
        protocol,
        tls=(tls_files["label"], tls_files["feature"]),
    )
    assert ours.intersection == theirs.intersection == ids("c", range(25, 50))


@pytest.mark.parametrize("protocol", [installed("rr22")])
def test_one_party_measures_its_own_traffic_without_the_peer_noticing(protocol, tls_files):
    outcome = run_both(tls_files["label"], tls_files["feature"], timeout=20.0, measure=True)
    label, feature = outcome["label"], outcome["feature"]
    assert label.intersection == feature.intersection == ids("c", range(25, 50))
    # The same session measured by local_psi's relays: of the same order (TLS handshakes and
    # framing vary a little between sessions).
    ours, _ = local_psi(
        ids("c", range(50)), ids("c", range(25, 80)), protocol,
        tls=(tls_files["label"], tls_files["feature"]),
    )  # fmt: skip
    assert label.bytes_sent > 0 and label.bytes_received > 0
    assert 0.5 < label.bytes_sent / ours.bytes_sent < 2
    assert 0.5 < label.bytes_received / ours.bytes_received < 2
    assert feature.bytes_sent is None  # it did not ask to measure


@pytest.mark.parametrize("protocol", [installed("rr22")])
@pytest.mark.parametrize("intruder", ["certificate from another CA", "no TLS"])
def test_a_party_without_a_certificate_from_the_ca_cannot_take_part(protocol, tls_files, intruder):
    feature_tls = tls_files["rogue"] if intruder != "no TLS" else None
    outcome = run_both(tls_files["label"], feature_tls)
    # Neither side gets a result: the label holder refuses the link, so no session starts.
    assert isinstance(outcome["label"], FedShopError), outcome["label"]
    assert isinstance(outcome["feature"], FedShopError), outcome["feature"]
    assert "could not connect" in str(outcome["label"])
    if intruder != "no TLS":
        assert "certificate verify failed" in str(outcome["label"]) or "unknown ca" in str(
            outcome["label"]
        )


@pytest.mark.parametrize("protocol", [installed("rr22")])
def test_an_absent_peer_is_a_clear_error_and_nothing_is_left_behind(
    protocol, tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where each party's files go
    from fedshop.secure.psi import _free_ports

    port, unused = _free_ports(2)
    with pytest.raises(FedShopError, match=r"could not connect to the feature holder"):
        run_psi_party(
            "label",
            ["a"],
            self_address=f"127.0.0.1:{port}",
            peer_address=f"127.0.0.1:{unused}",
            timeout=1.0,
        )
    local_psi(["a", "b"], ["b"], protocol)
    assert list(tmp_path.iterdir()) == []
