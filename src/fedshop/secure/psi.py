"""Private set intersection (PSI) on customer ids: which customers two companies share, for vertical
federated learning, without either learning the other's other customers.

The label holder (the platform, which holds the training labels) and the feature holder (a partner
with extra features on some of the same customers) each put in their customer ids. The label holder
is spu's rank 0, the PSI receiver.

Protocols (all secure against semi-honest parties — ones that follow the protocol but try to learn
more from what they see; none is claimed secure against a party that deviates from it):

- "rr22" (default; SecretFlow spu 0.9.5): OPRF from VOLE with an OKVS encoding (Raghuraman–Rindal
  2022). The fastest here (benchmarks/psi.py, both parties on one 2-core machine that other jobs
  kept busy, load 3.3–3.7): 100k × 100k in 1.3 s, 1M × 1M in 11.3 s end to end (8.0 s of
  protocol), 35 MB on the wire; openmined takes 26 s at 100k.
- "kkrt" (spu): OPRF from OT extension (Kolesnikov–Kumaresan–Rosulek–Trieu 2016).
- "ecdh" (spu, Curve25519: 3.6 s at 100k where FourQ took 7.2 s): each side raises the hashed ids to
  its secret key (Diffie–Hellman style); its security rests on the decisional Diffie–Hellman
  assumption, the OPRF protocols' on OT/VOLE and a random-oracle hash.
- "openmined" (openmined-psi 2.0.6): ECDH over P-256 as messages (`secure/psi_openmined.py`), for a
  transport FedShop already has (Flower messages) instead of spu's link; far slower.

What each side learns:

- both: the other side's number of (distinct) ids. The protocols reveal it anyway — spu exchanges
  set sizes while it buckets the inputs, ECDH sends one masked element per id — and FedShop
  records it in `PsiResult.peer_size`.
- the label holder: the intersection (the ids it holds that the feature holder also holds). It
  learns nothing about the feature holder's other ids beyond their number.
- the feature holder: with reveal_to="both", the intersection as well (spu's receiver broadcasts
  it, or the openmined client sends it); with reveal_to="label", nothing but the label holder's set
  size — spu's sender then reports no intersection count either (`intersection_size` is None).

Ids are strings (integers are written in decimal; other types are refused). Each is encoded as a
truncated SHA-256 of a domain-separated UTF-8 string (`encode_id`) before it reaches a protocol, so
commas, quotes or newlines in ids cannot corrupt spu's CSV files, and mapped back afterwards. The
hash is an encoding, not protection (ids can be guessed and hashed): no protocol sends a
non-member's key in the clear (tests/test_psi.py searches the wire bytes for every encoding).
Duplicate ids are dropped before the PSI and counted (`PsiResult.duplicates`); an empty list, an
empty id or an id of another type is a `FedShopError`.

The link (spu's brpc, one listening port per party): run it with TLS (`PsiTls`) on any network
that others can reach. Both sides then present a certificate signed by the CA the two companies
share and verify the other's against it, so only the peer holding such a certificate completes a
session; a party without a CA-signed certificate, or without TLS, fails to connect and receives
nothing (tests/test_psi.py). brpc's server also accepts plaintext connections on a TLS port, so an
uncertified client can still deliver bytes to it — but a session needs both directions, and this
party sends only over connections whose certificate it verified. Only the CA's signature is
checked, not a host name: the CA must sign certificates for the two parties of the PSI only.

Each party's session runs in a child process (secure/psi_spu.py says why), with its files in an
owner-only temporary folder that is removed afterwards. A party that starts before its peer keeps
trying to connect for `timeout` seconds; once the peer is up, brpc may take up to 3 s more to
notice (its health check). `local_psi` runs both parties on loopback for the simulator and tests.
"""

from __future__ import annotations

import base64
import hashlib
import numbers
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedshop.errors import FedShopError
from fedshop.secure import psi_openmined, psi_spu
from fedshop.secure.psi_relay import CountingRelay

SPU_PROTOCOLS = ("rr22", "kkrt", "ecdh")
PROTOCOLS = (*SPU_PROTOCOLS, "openmined")
DEFAULT_PROTOCOL = "rr22"
ROLES = ("label", "feature")
REVEAL_TO = ("both", "label")
_DOMAIN = b"fedshop-psi-id/v1\x00"


@dataclass(frozen=True)
class PsiTls:
    """One party's TLS files: the CA both parties trust, and this party's certificate and key
    (PEM; the certificate must allow both TLS server and client use, as each party is both)."""

    ca: Path
    certificate: Path
    key: Path


@dataclass
class PsiResult:
    """One party's outcome. `intersection` is the sorted shared ids (as strings), or None for a
    party that learns nothing. `seconds` is the protocol's time once the link is up (not the wait
    for the peer to appear). `bytes_sent`/`bytes_received` are measured on the wire (None when not
    measured: spu's link keeps no counters, `local_psi` relays it to count)."""

    role: str
    protocol: str
    reveal_to: str
    intersection: list[str] | None
    own_size: int  # distinct ids put in
    peer_size: int | None
    intersection_size: int | None
    duplicates: int  # repeated ids dropped before the PSI
    seconds: float
    bytes_sent: int | None = None
    bytes_received: int | None = None
    # The raw bytes this party received (local_psi(..., capture=True) only): for tests that search
    # them for ids the party must not learn.
    received_wire: bytes | None = field(default=None, repr=False)


def psi_available(protocol: str = DEFAULT_PROTOCOL) -> bool:
    """Whether `protocol`'s library is installed (see `require_backend` for how to install it)."""
    _check_choice("protocol", protocol, PROTOCOLS)
    return psi_openmined.available() if protocol == "openmined" else psi_spu.available()


def require_backend(protocol: str) -> None:
    """FedShopError, saying how to install it, when `protocol`'s library is missing."""
    _check_choice("protocol", protocol, PROTOCOLS)
    if protocol == "openmined":
        psi_openmined.load()
    else:
        psi_spu.library_path("libspu")
        psi_spu.library_path("libpsi")


# ---- inputs ----


KEY_BYTES = 15  # 120 bits: exactly 20 base64 characters, no padding


def encode_id(customer_id: str) -> str:
    """The CSV-safe key an id travels under into a protocol: the first 120 bits of the SHA-256 of a
    domain-separated UTF-8 string, in URL-safe base64 (20 characters). Two different ids among two
    million collide with probability below 2^-80. Short keys matter: spu's CSV reading, bucketing
    and result join take about twice as long on the 64-character hex digest."""
    return base64.urlsafe_b64encode(_digest(customer_id)).decode("ascii")


def _digest(customer_id: str) -> bytes:
    return hashlib.sha256(_DOMAIN + customer_id.encode("utf-8")).digest()[:KEY_BYTES]


@dataclass
class PreparedIds:
    keys: list[str]  # encoded, distinct, in first-seen order
    ids_of: dict[str, str]  # key → id
    duplicates: int


def prepare_ids(ids: Iterable) -> PreparedIds:
    """The ids checked, as text, deduplicated and encoded (`encode_id`)."""
    if isinstance(ids, str | bytes):
        raise FedShopError("PSI ids must be a collection of ids, not a single string")
    texts = [value if type(value) is str and value else _as_text(value) for value in ids]
    if not texts:
        raise FedShopError("PSI needs at least one customer id; the list is empty")
    # One base64 pass over all digests (15 bytes each encode to 20 characters), then sliced.
    sha256 = hashlib.sha256
    digests = [sha256(_DOMAIN + t.encode("utf-8")).digest()[:KEY_BYTES] for t in texts]
    encoded = base64.urlsafe_b64encode(b"".join(digests)).decode("ascii")
    width = len(encoded) // len(texts)
    keys = [encoded[i : i + width] for i in range(0, len(encoded), width)]
    ids_of = dict(zip(keys, texts, strict=True))  # a repeated id keeps its first place
    return PreparedIds(keys=list(ids_of), ids_of=ids_of, duplicates=len(texts) - len(ids_of))


def _as_text(value) -> str:
    if isinstance(value, str):
        if not value:
            raise FedShopError("PSI ids must not be empty strings")
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))  # so 7, np.int64(7) and "7" are one id on both sides
    raise FedShopError(
        f"PSI ids must be strings or integers, got {type(value).__name__} {value!r:.40}"
    )


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FedShopError(f"PSI {what} must be one of {', '.join(choices)}, got {value!r}")


def _decode(keys: list[str] | None, prepared: PreparedIds) -> list[str] | None:
    if keys is None:
        return None
    found = [prepared.ids_of.get(k) for k in keys]
    if None in found:
        raise FedShopError("PSI: the result names ids this party does not hold")
    found.sort()
    return found


# ---- one party over spu's link ----


def run_psi_party(
    role: str,
    ids: Iterable | PreparedIds,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    self_address: str,
    peer_address: str,
    reveal_to: str = "both",
    tls: PsiTls | None = None,
    timeout: float = 120.0,
    measure_bytes: bool = False,
) -> PsiResult:
    """This party's side of a PSI session with the peer at `peer_address` ("host:port"), listening
    on `self_address`. With `measure_bytes`, this party's traffic passes through two
    `CountingRelay`s of its own (one listening on `self_address` in front of spu's listener on a
    loopback port, one in front of the peer) and the result carries the bytes each way as they
    cross the network (TLS ciphertext included); the peer notices nothing. Both parties must use
    the same protocol and reveal_to. `ids` may also be `prepare_ids(ids)`, already checked and
    encoded. Blocks until the session ends (it runs in a
    child process: see secure/psi_spu.py); a FedShopError when the peer cannot be reached within
    `timeout` seconds, fails TLS, or breaks off."""
    _check_choice("role", role, ROLES)
    _check_choice("reveal_to", reveal_to, REVEAL_TO)
    _check_choice("protocol", protocol, PROTOCOLS)
    if protocol == "openmined":
        raise FedShopError(
            "PSI protocol 'openmined' is message-based: use secure.psi_openmined's OpenminedLabel "
            "and OpenminedFeature and carry their bytes over your own transport"
        )
    require_backend(protocol)
    prepared = ids if isinstance(ids, PreparedIds) else prepare_ids(ids)
    paths = None
    if tls is not None:
        paths = psi_spu.TlsPaths(
            *(str(Path(p).resolve()) for p in (tls.ca, tls.certificate, tls.key))
        )
        for path in (paths.ca, paths.certificate, paths.key):
            if not Path(path).is_file():
                raise FedShopError(f"PSI TLS file not found: {path}")
    rank = ROLES.index(role)
    # Owner-only (mkdtemp makes it 0700), removed afterwards: the ids' encodings, spu's metadata
    # beside them, and the intersection.
    relays: list[CountingRelay] = []
    listen_on, reach = self_address, peer_address
    if measure_bytes:
        inner = f"127.0.0.1:{_free_ports(1)[0]}"
        relays = [
            CountingRelay(inner, patience=timeout, listen=self_address),  # the peer → us
            CountingRelay(peer_address, patience=timeout),  # us → the peer
        ]
        listen_on, reach = inner, relays[1].address
    try:
        with tempfile.TemporaryDirectory(prefix=f"fedshop-psi-{role}-") as workdir:
            outcome = psi_spu.run_party(
                rank,
                prepared.keys,
                protocol=protocol,
                self_address=listen_on,
                peer_address=reach,
                broadcast=reveal_to == "both",
                tls=paths,
                timeout=timeout,
                workdir=Path(workdir),
            )
    finally:
        for relay in relays:
            relay.close()
    sent = received = None
    if relays:
        inbound, outbound = relays
        sent = outbound.upstream + inbound.downstream
        received = inbound.upstream + outbound.downstream
    intersection = _decode(outcome.keys, prepared)
    return PsiResult(
        role=role,
        protocol=protocol,
        reveal_to=reveal_to,
        intersection=intersection,
        own_size=len(prepared.keys),
        peer_size=outcome.peer_size,
        intersection_size=None if intersection is None else len(intersection),
        duplicates=prepared.duplicates,
        seconds=outcome.seconds,
        bytes_sent=sent,
        bytes_received=received,
    )


# ---- both parties here, on loopback ----


def local_psi(
    label_ids: Iterable,
    feature_ids: Iterable,
    protocol: str = DEFAULT_PROTOCOL,
    reveal_to: str = "both",
    *,
    tls: tuple[PsiTls | None, PsiTls | None] | None = None,
    timeout: float = 120.0,
    capture: bool = False,
) -> tuple[PsiResult, PsiResult]:
    """Both parties here (a thread each, each running its spu session in a child process,
    talking over 127.0.0.1 on free ports) — for the in-process simulator, tests and benchmarks.
    Returns (label holder's, feature holder's) results. Each party reaches the other through a
    `CountingRelay`, which fills in the bytes each way (and, with `capture`, keeps them in
    `received_wire`), and spares a session whose sides start a moment apart brpc's 3 s wait."""
    _check_choice("protocol", protocol, PROTOCOLS)
    _check_choice("reveal_to", reveal_to, REVEAL_TO)
    if protocol == "openmined":
        return _local_openmined(label_ids, feature_ids, reveal_to, capture)
    require_backend(protocol)
    # Bad inputs fail here, before any thread starts.
    label_ids, feature_ids = prepare_ids(label_ids), prepare_ids(feature_ids)
    tls = tls or (None, None)
    ports = _free_ports(2)
    own = [f"127.0.0.1:{p}" for p in ports]
    relays = [CountingRelay(address, capture=capture, patience=timeout) for address in own]
    reach = [r.address for r in relays]  # each party reaches the other through its relay
    results: list[PsiResult | None] = [None, None]
    errors: list[BaseException | None] = [None, None]

    def party(rank: int, ids: PreparedIds) -> None:
        try:
            results[rank] = run_psi_party(
                ROLES[rank],
                ids,
                protocol=protocol,
                self_address=own[rank],
                peer_address=reach[1 - rank],
                reveal_to=reveal_to,
                tls=tls[rank],
                timeout=timeout,
            )
        except BaseException as error:
            errors[rank] = error

    threads = [
        threading.Thread(target=party, args=(rank, ids), name=f"psi-{ROLES[rank]}")
        for rank, ids in enumerate((label_ids, feature_ids))
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for relay in relays:
            relay.close()
    for error in errors:
        if error is not None:
            raise error
    label, feature = results

    # relays[r] sits in front of party r: its upstream is what the other party sent to r.
    def wire(relay_up: CountingRelay, relay_down: CountingRelay) -> bytes | None:
        return relay_up.captured("up") + relay_down.captured("down") if capture else None

    label = replace(
        label,
        bytes_sent=relays[1].upstream + relays[0].downstream,
        bytes_received=relays[0].upstream + relays[1].downstream,
        received_wire=wire(relays[0], relays[1]),
    )
    feature = replace(
        feature,
        bytes_sent=relays[0].upstream + relays[1].downstream,
        bytes_received=relays[1].upstream + relays[0].downstream,
        received_wire=wire(relays[1], relays[0]),
    )
    return label, feature


def _local_openmined(
    label_ids, feature_ids, reveal_to: str, capture: bool
) -> tuple[PsiResult, PsiResult]:
    require_backend("openmined")
    ours, theirs = prepare_ids(label_ids), prepare_ids(feature_ids)
    started = time.perf_counter()
    label = psi_openmined.OpenminedLabel(ours.keys)
    feature = psi_openmined.OpenminedFeature(theirs.keys)
    request = label.request()
    reply = feature.reply(request)
    found = label.intersection(reply)
    to_label, to_feature = len(reply), len(request)
    feature_found = None
    if reveal_to == "both":
        result = label.result()
        to_feature += len(result)
        feature_found = feature.accept(result)
    seconds = time.perf_counter() - started

    def outcome(role, prepared, keys, peer_size, sent, received, wire):
        intersection = _decode(keys, prepared)
        return PsiResult(
            role=role,
            protocol="openmined",
            reveal_to=reveal_to,
            intersection=intersection,
            own_size=len(prepared.keys),
            peer_size=peer_size,
            intersection_size=None if intersection is None else len(intersection),
            duplicates=prepared.duplicates,
            seconds=seconds,
            bytes_sent=sent,
            bytes_received=received,
            received_wire=wire if capture else None,
        )

    feature_wire = request + (label.result() if reveal_to == "both" else b"")
    return (
        outcome("label", ours, found, label.peer_size, to_feature, to_label, reply),
        outcome(
            "feature", theirs, feature_found, feature.peer_size, to_label, to_feature, feature_wire
        ),
    )


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
