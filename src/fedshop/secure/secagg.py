"""Secure aggregation (Bonawitz et al., CCS 2017) with SecAgg+ neighbourhoods (Bell et al., CCS 2020).

The server learns the sum of the surviving clients' vectors and nothing else about any one of them,
even when clients drop out after the key-sharing step. One round, four steps:

1. **Advertise keys.** Each client makes two fresh X25519 key pairs: one to encrypt the shares it
   sends to its neighbours (c), one to agree pairwise mask seeds (s). Only public keys are sent.
2. **Share keys.** Each client draws a self-mask seed b, splits b and its secret key s_sk into Shamir
   shares (threshold t among its k neighbours and itself, a strict majority of the k + 1 by
   default), keeps its own share of b, and sends each neighbour its two shares encrypted
   with AES-GCM under a key agreed with that neighbour: the server routes shares but cannot read
   them, and a tampered share fails authentication. It also sends a SHA-256 commitment to b.
3. **Masked input.** Each client rounds its update into the ring Z_{2^bits} (`ring.py`) and adds
   PRG(b) plus, for every neighbour j that shared keys, ±PRG(s_ij) (+ when j > i, − when j < i), where
   s_ij is agreed by X25519 and HKDF. The pairwise masks cancel in the sum; PRG(b) hides a client
   whose pairwise masks the server later removes.
4. **Unmask.** The server names who survived and who dropped. Each survivor returns, per neighbour,
   the share of b (neighbour survived) or of s_sk (neighbour dropped), never both, and its own
   share of its own b. The server
   rebuilds each survivor's b and removes PRG(b), and each dropped client's s_sk and removes the
   dropped client's pairwise masks from its surviving neighbours' inputs.

Neighbourhoods (SecAgg+): with `neighbours = k < n-1`, clients sit on a randomly permuted ring and
each is joined to its k nearest, so client cost grows with k ≈ 4·log2(n), not n. Everyone is joined
to everyone when k ≥ n-1 (the original SecAgg).

Primitives come from well-kept libraries: X25519, HKDF-SHA256, AES-GCM and AES-256-CTR (the mask PRG)
from `cryptography`; Shamir sharing over a prime field in `shamir.py` (secret sharing, not a cipher).
Nothing here is a new cipher.

Threat model: an honest-but-curious server and clients; fewer than t of a client's neighbours
colluding with the server learn nothing about its input. Dropouts: a round survives as long as every
survivor keeps t - 1 surviving neighbours and every dropped client t surviving neighbours (with three
clients, k = 2 and t = 2: any one may drop). A malicious server that lies about who
dropped is not covered (the actively secure variant adds signatures and a consistency round).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedshop.config import ProtectionConfig
from fedshop.secure import shamir
from fedshop.secure.protocol import (
    ProtectionCost,
    ProtectionError,
    SecureSumResult,
    check_inputs,
)
from fedshop.secure.ring import FixedPointRing

# Secrets that get Shamir-shared are 128-bit seeds (the security level of X25519 itself); keys are
# derived from them. Each share is one field element.
SEED_BYTES = 16
SHARE_BYTES = shamir.SHARE_BYTES
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
_NONCE_BYTES = 12


# ---------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------


def expand_mask(seed: bytes, length: int, ring: FixedPointRing) -> np.ndarray:
    """A uniform vector of ring elements from a seed: the AES-CTR keystream under a key derived from
    it (a PRG under the standard assumption on AES)."""
    out = np.zeros(length, dtype=ring.dtype)
    apply_masks(out, [(seed, 1)])
    return out


def apply_masks(total: np.ndarray, masks: Sequence[tuple[bytes | np.ndarray, int]]) -> None:
    """total += Σ sign·term over `masks` of (term, ±1), in place, modulo the ring; a term is a seed
    (its PRG expansion is added) or a ring vector (added as it is).

    Hardware AES-CTR fills a reused buffer at several GB/s, where allocating a fresh keystream per
    mask costs four times as much; AES and numpy release the GIL, so the terms are split over one
    thread per core, each with its own buffer and running total."""
    workers = min(len(masks), os.cpu_count() or 1)
    if workers <= 1:
        _masks_into(total, masks)
        return
    parts = [masks[w::workers] for w in range(workers)]
    partial = [np.zeros_like(total) for _ in range(workers - 1)]
    with ThreadPoolExecutor(workers) as pool:
        done = [pool.submit(_masks_into, total, parts[0])]
        done += [
            pool.submit(_masks_into, acc, part)
            for acc, part in zip(partial, parts[1:], strict=True)
        ]
        for future in done:
            future.result()
    for acc in partial:
        total += acc


def _masks_into(total: np.ndarray, masks: Sequence[tuple[bytes | np.ndarray, int]]) -> None:
    size = total.nbytes
    zeros = bytes(size)  # the keystream is the encryption of zeros
    buffer = bytearray(size + 15)  # update_into wants room for a block beyond the data
    keystream = np.frombuffer(buffer, dtype=total.dtype, count=total.size)
    for term, sign in masks:
        if isinstance(term, np.ndarray):
            stream = term
        else:
            key = term if len(term) == 32 else _kdf(term, b"self-mask/", b"")
            cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
            cipher.update_into(zeros, buffer)
            stream = keystream
        if sign > 0:
            total += stream
        else:
            total -= stream


def _kdf(secret: bytes, purpose: bytes, session: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedshop-secagg/" + purpose + session
    ).derive(secret)


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


def split_secret(secret: bytes, threshold: int, n_shares: int) -> list[bytes]:
    """Shamir shares of a 16-byte seed: share x (1-based) is the list's item x-1."""
    return shamir.split(secret, threshold, n_shares)


def combine_secret(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """The 16-byte seed from exactly the threshold number of (x, share) pairs."""
    try:
        return shamir.combine(shares, SEED_BYTES)
    except shamir.ShareError as error:
        raise ProtectionError(f"secret shares do not combine: {error}") from None


def mask_key(seed: bytes) -> X25519PrivateKey:
    """The X25519 key for pairwise masks, derived from a shareable 16-byte seed."""
    return X25519PrivateKey.from_private_bytes(_kdf(seed, b"mask-key/", b""))


def secagg_plus_graph(
    n_clients: int, neighbours: int, rng: random.Random
) -> dict[int, tuple[int, ...]]:
    """Each client's neighbours: a randomly permuted ring (Harary graph), each client joined to its
    k/2 nearest on either side; everyone to everyone when k ≥ n-1."""
    if neighbours >= n_clients - 1:
        return {i: tuple(j for j in range(n_clients) if j != i) for i in range(n_clients)}
    order = list(range(n_clients))
    rng.shuffle(order)
    position = {client: p for p, client in enumerate(order)}
    half = neighbours // 2
    graph = {}
    for client in range(n_clients):
        p = position[client]
        near = {order[(p + d) % n_clients] for d in range(-half, half + 1) if d != 0}
        graph[client] = tuple(sorted(near))
    return graph


def default_neighbours(n_clients: int) -> int:
    """k ≈ 4·log2(n) (even), as in SecAgg+'s O(log n) neighbourhoods; everyone for small rounds."""
    if n_clients <= 2:
        return max(n_clients - 1, 1)
    k = 2 * math.ceil(2 * math.log2(n_clients))
    return min(k, n_clients - 1)


# ---------------------------------------------------------------------------------------------
# Messages and the two parties
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundSetup:
    """What the server announces when a round starts; every party uses the same values."""

    session: bytes  # fresh per round: binds keys, shares and masks to this round only
    n_clients: int
    graph: dict[int, tuple[int, ...]]
    threshold: int
    ring: FixedPointRing
    length: int

    def __post_init__(self) -> None:
        # A client's secrets are shared among its neighbours and itself (`holders`).
        smallest = min((len(v) for v in self.graph.values()), default=0) + 1
        if not 1 <= self.threshold <= smallest:
            raise ProtectionError(
                f"SecAgg threshold {self.threshold} must be between 1 and the share holders "
                f"of a client, {smallest}"
            )

    def to_json(self) -> str:
        """What the server announces, as text for a message between processes."""
        ring = self.ring
        return json.dumps(
            {
                "session": self.session.hex(),
                "n_clients": self.n_clients,
                "graph": {str(i): list(v) for i, v in self.graph.items()},
                "threshold": self.threshold,
                "ring": [ring.bound, ring.n_clients, ring.bits],
                "length": self.length,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> RoundSetup:
        data = json.loads(text)
        bound, n_clients, bits = data["ring"]
        return cls(
            session=bytes.fromhex(data["session"]),
            n_clients=int(data["n_clients"]),
            graph={int(i): tuple(int(j) for j in v) for i, v in data["graph"].items()},
            threshold=int(data["threshold"]),
            ring=FixedPointRing.for_sum(float(bound), int(n_clients), int(bits)),
            length=int(data["length"]),
        )


@dataclass(frozen=True)
class SharePackage:
    commitment: bytes  # SHA-256 of the self-mask seed
    ciphertexts: dict[int, bytes]  # neighbour → AES-GCM(nonce ‖ shares)

    def size(self) -> int:
        return len(self.commitment) + sum(4 + len(c) for c in self.ciphertexts.values())

    def to_json(self) -> str:
        return json.dumps(
            {"commitment": self.commitment.hex(), **_hex_by_index(self.ciphertexts, "ciphertexts")}
        )

    @classmethod
    def from_json(cls, text: str) -> SharePackage:
        data = json.loads(text)
        return cls(bytes.fromhex(data["commitment"]), _bytes_by_index(data["ciphertexts"]))


def _hex_by_index(blobs: dict[int, bytes], name: str) -> dict:
    return {name: {str(i): blob.hex() for i, blob in blobs.items()}}


def _bytes_by_index(blobs: dict[str, str]) -> dict[int, bytes]:
    return {int(i): bytes.fromhex(blob) for i, blob in blobs.items()}


def keys_to_json(keys: dict[int, tuple[bytes, bytes]]) -> str:
    """Index → advertised public keys (c, s) as text for a message."""
    return json.dumps({str(i): [c.hex(), s.hex()] for i, (c, s) in keys.items()})


def keys_from_json(text: str) -> dict[int, tuple[bytes, bytes]]:
    return {int(i): (bytes.fromhex(c), bytes.fromhex(s)) for i, (c, s) in json.loads(text).items()}


def round_details(setup: RoundSetup, dropped_after: int, dropped_before: int) -> dict:
    """What a round's cost record says of the protocol, in either runtime."""
    return {
        "neighbours": max((len(v) for v in setup.graph.values()), default=0),
        "threshold": setup.threshold,
        "ring_bits": setup.ring.bits,
        "resolution": setup.ring.resolution,
        "dropped_after_shares": dropped_after,
        "dropped_before_shares": dropped_before,
        "plaintext_bytes_per_client": setup.length * 4,  # float32, as sent unprotected
    }


def blobs_to_json(blobs: dict[int, bytes]) -> str:
    """Index → bytes (routed shares, unmasking answers) as text for a message."""
    return json.dumps(_hex_by_index(blobs, "blobs"))


def blobs_from_json(text: str) -> dict[int, bytes]:
    return _bytes_by_index(json.loads(text)["blobs"])


class SecAggClient:
    """One client's side of a round. Holds its secrets; hands out only what the protocol allows."""

    def __init__(self, index: int, setup: RoundSetup) -> None:
        self.index = index
        self.setup = setup
        self.neighbours = setup.graph[index]
        self._c_key = X25519PrivateKey.generate()
        self._s_seed = os.urandom(SEED_BYTES)
        self._s_key = mask_key(self._s_seed)
        self._seed = os.urandom(SEED_BYTES)
        self._public: dict[int, tuple[bytes, bytes]] = {}
        # From each neighbour: (x, b-share, sk-share).
        self._held: dict[int, tuple[int, bytes, bytes]] = {}
        self._own_b_share: bytes | None = None  # this client's share of its own self-mask seed
        self._masked_with: tuple[int, ...] | None = None  # set once the masked input is out
        self._answered = False

    # A deployed client is a fresh process at every step (Flower starts one per message): its
    # round secrets are kept between steps by the client's owner, in a file only it can read.

    def secrets(self) -> str:
        """Everything this client holds for the round, secret keys included, as text."""
        return json.dumps(
            {
                "c_key": self._c_key.private_bytes_raw().hex(),
                "s_seed": self._s_seed.hex(),
                "seed": self._seed.hex(),
                "public": {str(j): [a.hex(), b.hex()] for j, (a, b) in self._public.items()},
                "held": {str(j): [x, b.hex(), s.hex()] for j, (x, b, s) in self._held.items()},
                "own_b_share": None if self._own_b_share is None else self._own_b_share.hex(),
                "masked_with": self._masked_with,
                "answered": self._answered,
            }
        )

    @classmethod
    def resume(cls, index: int, setup: RoundSetup, secrets: str) -> SecAggClient:
        """The client as `secrets()` left it, for the same round."""
        data = json.loads(secrets)
        client = cls.__new__(cls)
        client.index, client.setup, client.neighbours = index, setup, setup.graph[index]
        client._c_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(data["c_key"]))
        client._s_seed = bytes.fromhex(data["s_seed"])
        client._s_key = mask_key(client._s_seed)
        client._seed = bytes.fromhex(data["seed"])
        client._public = {
            int(j): (bytes.fromhex(a), bytes.fromhex(b)) for j, (a, b) in data["public"].items()
        }
        client._held = {
            int(j): (int(x), bytes.fromhex(b), bytes.fromhex(s))
            for j, (x, b, s) in data["held"].items()
        }
        own = data.get("own_b_share")
        client._own_b_share = None if own is None else bytes.fromhex(own)
        masked_with = data["masked_with"]
        client._masked_with = None if masked_with is None else tuple(masked_with)
        client._answered = bool(data["answered"])
        return client

    # Step 1
    def advertise(self) -> tuple[bytes, bytes]:
        return _public_bytes(self._c_key), _public_bytes(self._s_key)

    # Step 2
    def share_keys(self, public_keys: dict[int, tuple[bytes, bytes]]) -> SharePackage:
        """`public_keys`: the advertised keys of this client's neighbours who are still present."""
        present = [j for j in self.neighbours if j in public_keys]
        if len(present) + 1 < self.setup.threshold:
            raise ProtectionError(
                f"client {self.index}: only {len(present)} neighbours advertised keys; the round "
                f"needs at least {self.setup.threshold - 1}"
            )
        self._public = {j: public_keys[j] for j in present}
        # Shares go to x = position + 1 in the full neighbour list, so every share has a fixed x;
        # x = k + 1 is this client's own share of its self-mask seed, which it adds when it
        # survives: with k = 2 (three clients) a survivor whose other neighbour dropped still
        # reaches t = 2 shares of its seed.
        k = len(self.neighbours)
        b_shares = split_secret(self._seed, self.setup.threshold, k + 1)
        sk_shares = split_secret(self._s_seed, self.setup.threshold, k + 1)
        self._own_b_share = b_shares[k]
        ciphertexts = {}
        for x, j in enumerate(self.neighbours, start=1):
            if j not in self._public:
                continue
            plaintext = x.to_bytes(2, "big") + b_shares[x - 1] + sk_shares[x - 1]
            nonce = os.urandom(_NONCE_BYTES)
            ciphertexts[j] = nonce + self._channel(j).encrypt(
                nonce, plaintext, self._route(self.index, j)
            )
        return SharePackage(hashlib.sha256(self._seed).digest(), ciphertexts)

    # Step 3
    def masked_input(self, vector: np.ndarray, received: dict[int, bytes]) -> np.ndarray:
        """`received`: the encrypted shares neighbours sent this client (routed by the server)."""
        if self._masked_with is not None:
            # Two masked inputs under one set of masks but different neighbour sets would show
            # the server the difference of their pairwise masks.
            raise ProtectionError(f"client {self.index}: already sent this round's masked input")
        if vector.shape != (self.setup.length,):
            raise ProtectionError(
                f"client {self.index}: update has shape {vector.shape}; the round expects "
                f"({self.setup.length},)"
            )
        for j, blob in received.items():
            if j not in self._public:
                raise ProtectionError(f"client {self.index}: a share from non-neighbour {j}")
            try:
                plaintext = self._channel(j).decrypt(
                    blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], self._route(j, self.index)
                )
            except InvalidTag:
                raise ProtectionError(
                    f"client {self.index}: the share from client {j} failed authentication "
                    "(tampered or misrouted); the round is aborted"
                ) from None
            x = int.from_bytes(plaintext[:2], "big")
            self._held[j] = (x, plaintext[2 : 2 + SHARE_BYTES], plaintext[2 + SHARE_BYTES :])
        # Mask only with neighbours whose shares arrived: exactly those the server can unmask.
        self._masked_with = tuple(sorted(self._held))
        masked = self.setup.ring.encode(vector)
        masks = [(self._seed, 1)]
        for j in self._masked_with:
            seed = _pairwise_seed(self._s_key, self._public[j][1], self.setup.session)
            masks.append((seed, 1 if j > self.index else -1))
        apply_masks(masked, masks)
        return masked

    # Step 4
    def unmask(self, survivors: Collection[int], dropped: Collection[int]) -> dict[int, bytes]:
        """Shares for the server: of b for surviving neighbours, of s_sk for dropped ones. Answers
        once; refuses a request that would reveal both secrets of one neighbour."""
        if self._answered:
            raise ProtectionError(f"client {self.index}: already answered this round's unmasking")
        survivors, dropped = set(survivors), set(dropped)
        if survivors & dropped:
            raise ProtectionError(
                f"client {self.index}: the server named clients {sorted(survivors & dropped)} "
                "both survived and dropped; refusing to reveal shares"
            )
        self._answered = True
        answer = {}
        if self.index in survivors and self._own_b_share is not None:
            x = len(self.neighbours) + 1
            answer[self.index] = x.to_bytes(2, "big") + b"b" + self._own_b_share
        for j, (x, b_share, sk_share) in self._held.items():
            if j in survivors:
                answer[j] = x.to_bytes(2, "big") + b"b" + b_share
            elif j in dropped:
                answer[j] = x.to_bytes(2, "big") + b"s" + sk_share
        return answer

    def _channel(self, j: int) -> AESGCM:
        shared = self._c_key.exchange(X25519PublicKey.from_public_bytes(self._public[j][0]))
        return AESGCM(_kdf(shared, b"share-encryption/", self.setup.session))

    def _route(self, sender: int, receiver: int) -> bytes:
        return self.setup.session + sender.to_bytes(4, "big") + receiver.to_bytes(4, "big")


def _pairwise_seed(own: X25519PrivateKey, their_public: bytes, session: bytes) -> bytes:
    shared = own.exchange(X25519PublicKey.from_public_bytes(their_public))
    return _kdf(shared, b"pairwise-mask/", session)


@dataclass
class SecAggServer:
    """The server's side: routes messages, sums masked vectors, removes the masks it may remove."""

    setup: RoundSetup
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    packages: dict[int, SharePackage] = field(default_factory=dict)
    masked: dict[int, np.ndarray] = field(default_factory=dict)

    def collect_keys(self, index: int, keys: tuple[bytes, bytes]) -> None:
        if any(len(k) != 32 for k in keys):
            raise ProtectionError(f"client {index} advertised malformed public keys")
        self.public_keys[index] = keys

    def keys_for(self, index: int) -> dict[int, tuple[bytes, bytes]]:
        return {j: self.public_keys[j] for j in self.setup.graph[index] if j in self.public_keys}

    def collect_shares(self, index: int, package: SharePackage) -> None:
        if not set(package.ciphertexts) <= set(self.setup.graph[index]):
            raise ProtectionError(
                f"client {index} sent shares to clients outside its neighbourhood"
            )
        self.packages[index] = package

    def shares_for(self, index: int) -> dict[int, bytes]:
        return self.routed_shares().get(index, {})

    def routed_shares(self) -> dict[int, dict[int, bytes]]:
        """Every client that shared keys → the encrypted shares its neighbours sent it, routed in
        one pass over the packages (asking `shares_for` per client would scan them all each time)."""
        routed: dict[int, dict[int, bytes]] = {i: {} for i in self.packages}
        for j, package in self.packages.items():
            for i, ciphertext in package.ciphertexts.items():
                if i in routed:
                    routed[i][j] = ciphertext
        return routed

    def collect_masked(self, index: int, masked: np.ndarray) -> None:
        ring = self.setup.ring
        if masked.dtype != ring.dtype or masked.shape != (self.setup.length,):
            raise ProtectionError(
                f"client {index} sent a masked input of shape {masked.shape} and type "
                f"{masked.dtype}; the round expects ({self.setup.length},) of {ring.dtype.__name__}"
            )
        if index not in self.packages:
            raise ProtectionError(f"client {index} sent a masked input without sharing keys")
        self.masked[index] = masked

    def roster(self) -> tuple[list[int], list[int]]:
        """Survivors (sent a masked input) and dropped (shared keys, then went silent)."""
        survivors = sorted(self.masked)
        dropped = sorted(set(self.packages) - set(self.masked))
        return survivors, dropped

    def finish(self, answers: dict[int, dict[int, bytes]]) -> np.ndarray:
        """The float sum of the survivors' inputs, from the survivors' unmasking answers."""
        survivors, dropped = self.roster()
        if not survivors:
            raise ProtectionError("no client sent a masked input; nothing to aggregate")
        ring, length, t = self.setup.ring, self.setup.length, self.setup.threshold
        b_shares: dict[int, list[tuple[int, bytes]]] = {i: [] for i in survivors}
        sk_shares: dict[int, list[tuple[int, bytes]]] = {i: [] for i in dropped}
        for answer in answers.values():
            for owner, blob in answer.items():
                x, kind, share = int.from_bytes(blob[:2], "big"), blob[2:3], blob[3:]
                if len(share) != SHARE_BYTES or kind not in (b"b", b"s"):
                    raise ProtectionError(f"a malformed share of client {owner}'s secrets")
                target = b_shares if kind == b"b" else sk_shares
                if owner in target:
                    target[owner].append((x, share))
        # Everything the server adds up, in one parallel pass: the masked inputs, minus the
        # survivors' self masks, minus what dropped clients' pairwise masks left behind.
        masks: list[tuple[bytes | np.ndarray, int]] = [(self.masked[i], 1) for i in survivors]
        for index in survivors:
            seed = self._rebuild(index, b_shares[index], t, "self-mask seed")
            if hashlib.sha256(seed).digest() != self.packages[index].commitment:
                raise ProtectionError(
                    f"the rebuilt self-mask seed of client {index} does not match its commitment: "
                    "a share was tampered with; the round is aborted"
                )
            masks.append((seed, -1))
        for index in dropped:
            key = mask_key(self._rebuild(index, sk_shares[index], t, "mask key"))
            if _public_bytes(key) != self.public_keys[index][1]:
                raise ProtectionError(
                    f"the rebuilt mask key of dropped client {index} does not match its public "
                    "key: a share was tampered with; the round is aborted"
                )
            for j in self.packages[index].ciphertexts:
                # A survivor masked with the dropped client iff it received the client's shares.
                if j in self.masked:
                    seed = _pairwise_seed(key, self.public_keys[j][1], self.setup.session)
                    # j added +PRG when index > j: take back what j added.
                    masks.append((seed, -1 if index > j else 1))
        total = np.zeros(length, dtype=ring.dtype)
        apply_masks(total, masks)
        return ring.decode(total)

    @staticmethod
    def _rebuild(index: int, shares: list[tuple[int, bytes]], threshold: int, what: str) -> bytes:
        if len(shares) < threshold:
            raise ProtectionError(
                f"only {len(shares)} shares of client {index}'s {what} came back; {threshold} "
                "are needed (too many clients dropped out)"
            )
        # The lowest indices first: most clients then share one set of Lagrange weights.
        return combine_secret(sorted(shares)[:threshold])


# ---------------------------------------------------------------------------------------------
# The one driver of a round, and the in-process parties (a deployment's go by message)
# ---------------------------------------------------------------------------------------------


class SecAggParties(Protocol):
    """How the server reaches a round's clients: objects in this process, or messages over the
    network (`deploy/server_secagg.py`). Each step sends what the server routes to the listed
    clients and returns the answers that came back, by client index; a client that fails or stays
    silent is a dropout. `seconds` and `sent` are each client's own protocol time and bytes."""

    seconds: dict[int, float]
    sent: dict[int, int]

    def advertise(self) -> dict[int, tuple[bytes, bytes]]: ...

    def share_keys(
        self, keys: dict[int, dict[int, tuple[bytes, bytes]]]
    ) -> dict[int, SharePackage]: ...

    def masked_inputs(self, shares: dict[int, dict[int, bytes]]) -> dict[int, np.ndarray]: ...

    def unmask(self, survivors: list[int], dropped: list[int]) -> dict[int, dict[int, bytes]]: ...


@dataclass
class SecAggOutcome:
    total: np.ndarray  # float64: the sum of the survivors' vectors
    survivors: list[int]
    cost: ProtectionCost
    server: SecAggServer  # what the server saw (the masked inputs), for attack benchmarks
    rejected: dict[int, str] = field(default_factory=dict)  # clients whose message was refused


def run_secagg_round(
    setup: RoundSetup, parties: SecAggParties, needed: int = 2, kind: str = "secagg"
) -> SecAggOutcome:
    """One SecAgg round, the server's order of the four steps, in either runtime. Fewer than
    `needed` (never fewer than 2) masked inputs abandon the round before unmasking: unmasking then
    would reveal the sum of a smaller group than the round promised."""
    server = SecAggServer(setup)
    server_seconds = 0.0

    def on_server(work):
        nonlocal server_seconds
        started = time.perf_counter()
        out = work()
        server_seconds += time.perf_counter() - started
        return out

    rejected: dict[int, str] = {}

    def collect(i: int, work) -> None:
        # A message the server refuses (bad key, package or shape) makes its sender a dropout of
        # that step; the protocol recovers from dropouts, so the round goes on without it.
        try:
            on_server(work)
        except ProtectionError as reason:
            rejected[i] = str(reason)

    for i, keys in sorted(parties.advertise().items()):
        collect(i, lambda i=i, keys=keys: server.collect_keys(i, keys))
    routed = on_server(lambda: {i: server.keys_for(i) for i in sorted(server.public_keys)})
    for i, package in sorted(parties.share_keys(routed).items()):
        collect(i, lambda i=i, p=package: server.collect_shares(i, p))
    routed = on_server(server.routed_shares)
    for i, masked in sorted(parties.masked_inputs(routed).items()):
        collect(i, lambda i=i, m=masked: server.collect_masked(i, m))
    survivors, dropped = server.roster()
    if len(survivors) < max(2, needed):
        raise ProtectionError(
            f"{len(survivors)} clients sent masked updates, {max(2, needed)} needed; the round "
            "is abandoned before unmasking"
        )
    answers = parties.unmask(survivors, dropped)
    total = on_server(lambda: server.finish(answers))
    cost = ProtectionCost(
        kind=kind,
        client_seconds=[parties.seconds.get(i, 0.0) for i in survivors],
        server_seconds=server_seconds,
        bytes_sent_per_client=[parties.sent.get(i, 0) for i in survivors],
        details=round_details(setup, len(dropped), setup.n_clients - len(server.packages)),
    )
    return SecAggOutcome(total, survivors, cost, server, rejected)


@dataclass
class InProcessParties:
    """The round's clients as `SecAggClient` objects in this process, each one's work timed; the
    clients in `silent_before_shares` / `silent_after_shares` go silent before step 2 / after step
    2 (for tests and benchmarks of dropout recovery)."""

    setup: RoundSetup
    vectors: Sequence[np.ndarray]
    silent_before_shares: Collection[int] = ()
    silent_after_shares: Collection[int] = ()
    seconds: dict[int, float] = field(default_factory=dict)
    sent: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.vectors)
        self.clients = {
            i: self._timed(i, lambda i=i: SecAggClient(i, self.setup)) for i in range(n)
        }

    def _timed(self, i: int, work, size=lambda out: 0):
        started = time.perf_counter()
        out = work()
        self.seconds[i] = self.seconds.get(i, 0.0) + time.perf_counter() - started
        self.sent[i] = self.sent.get(i, 0) + size(out)
        return out

    def advertise(self) -> dict[int, tuple[bytes, bytes]]:
        return {
            i: self._timed(i, client.advertise, lambda keys: sum(len(k) for k in keys))
            for i, client in self.clients.items()
            if i not in self.silent_before_shares
        }

    def share_keys(self, keys):
        return {
            i: self._timed(i, lambda i=i, k=k: self.clients[i].share_keys(k), SharePackage.size)
            for i, k in keys.items()
        }

    def masked_inputs(self, shares):
        return {
            i: self._timed(i, lambda i=i, s=s: self._mask(i, s), _nbytes)
            for i, s in shares.items()
            if i not in self.silent_after_shares
        }

    def _mask(self, i: int, shares: dict[int, bytes]) -> np.ndarray:
        return self.clients[i].masked_input(self.vectors[i], shares)

    def unmask(self, survivors, dropped):
        return {
            i: self._timed(i, lambda i=i: self.clients[i].unmask(survivors, dropped), _answer_bytes)
            for i in survivors
        }


def _nbytes(array: np.ndarray) -> int:
    return array.nbytes


def _answer_bytes(answer: dict[int, bytes]) -> int:
    return sum(2 + len(v) for v in answer.values())


@dataclass
class SecAggSum:
    """`SecureSum` by SecAgg(+), all parties in this process (`InProcessParties`).

    `drop_before_shares` / `drop_after_shares` make the listed clients go silent before step 2 or
    after step 2 (before sending their masked input): for tests and benchmarks of dropout recovery.
    """

    neighbours: int | None = None  # k; None: `default_neighbours(n)`
    # t; None: a strict majority of a client's k + 1 share holders; a float: a fraction of them
    threshold: float | int | None = None
    ring_bits: int = 64
    drop_before_shares: Collection[int] = ()
    drop_after_shares: Collection[int] = ()
    kind: str = "secagg"
    rng: random.Random = field(default_factory=random.SystemRandom)
    # Keep what the server received (the masked inputs, read as numbers the way the server decodes
    # the sum) in `server_view`: for attack benchmarks.
    keep_server_view: bool = False
    server_view: dict[int, np.ndarray] | None = None

    @classmethod
    def from_config(cls, config: ProtectionConfig) -> SecAggSum:
        return cls(
            neighbours=config.neighbours or None,
            threshold=config.threshold or None,
            ring_bits=config.ring_bits,
        )

    def setup_for(self, n_clients: int, length: int, bound: float) -> RoundSetup:
        if n_clients < 2:
            raise ProtectionError("secure aggregation needs at least two clients in a round")
        k = default_neighbours(n_clients) if self.neighbours is None else self.neighbours
        k = min(max(k, 1), n_clients - 1)
        if k < n_clients - 1 and k % 2:
            k += 1  # the ring neighbourhood is symmetric: k/2 on either side
        # A client's secrets have k + 1 holders (its neighbours and itself). A strict majority of
        # them: a server that tells some holders a client survived and others that it dropped
        # cannot collect t shares of both of its secrets.
        holders = k + 1
        if self.threshold is None:
            t = holders // 2 + 1
        elif isinstance(self.threshold, float):
            t = max(1, math.ceil(self.threshold * holders))
        else:
            t = self.threshold
        graph = secagg_plus_graph(n_clients, k, self.rng)
        return RoundSetup(
            session=os.urandom(16),
            n_clients=n_clients,
            graph=graph,
            threshold=min(t, holders),
            ring=FixedPointRing.for_sum(bound, n_clients, self.ring_bits),
            length=length,
        )

    def sum(self, vectors: Sequence[np.ndarray], bound: float) -> SecureSumResult:
        length = check_inputs(vectors, bound)
        started = time.perf_counter()
        setup = self.setup_for(len(vectors), length, bound)
        setup_seconds = time.perf_counter() - started
        parties = InProcessParties(setup, vectors, self.drop_before_shares, self.drop_after_shares)
        outcome = run_secagg_round(setup, parties, kind=self.kind)
        if self.keep_server_view:
            masked = outcome.server.masked
            self.server_view = {i: setup.ring.decode(m) for i, m in masked.items()}
        cost = outcome.cost
        cost = ProtectionCost(
            cost.kind, cost.client_seconds, cost.server_seconds + setup_seconds,
            cost.bytes_sent_per_client, cost.details,
        )  # fmt: skip
        return SecureSumResult(total=outcome.total, contributors=outcome.survivors, cost=cost)
