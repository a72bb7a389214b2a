"""PSI as messages (OpenMined's `openmined-psi`, ECDH over P-256): bytes that any transport can carry,
for instance inside Flower messages.

The label holder is the client, who learns the intersection; the feature holder is the server.

1. label → feature: `request()` — the label holder's ids, each hashed to the curve and raised to
   its secret key (the feature holder learns how many there are, nothing else).
2. feature → label: `reply(request)` — the feature holder's own ids under its key (setup) and the
   request raised to its key too (response).
3. the label holder removes its key and compares: `intersection(reply)`.
4. only with reveal_to="both", label → feature: `result()`, the intersection, which the feature
   holder checks against its own ids (`accept(result)`).

The setup is a plain list of the feature holder's encrypted ids (openmined's RAW data structure):
exact, where the compressed ones (GCS, Bloom filter) let a false positive slip into the result.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from fedshop.errors import FedShopError

INSTALL = (
    "the openmined PSI backend needs openmined-psi 2.0.6: python -m pip install --no-deps "
    "openmined-psi==2.0.6 (--no-deps: it pins protobuf==6.30.2, which conflicts with the "
    "protobuf>=6.33.5 Flower's grpcio-health-checking needs; it runs on that newer protobuf)"
)


def load():
    try:
        import private_set_intersection.python as psi  # optional dependency
    except ImportError:
        raise FedShopError(INSTALL) from None
    return psi


def available() -> bool:
    try:
        load()
    except FedShopError:
        return False
    return True


def _pack(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">Q", len(p)) + p for p in parts)


def _unpack(message: bytes, count: int) -> list[bytes]:
    parts, offset = [], 0
    for _ in range(count):
        if offset + 8 > len(message):
            raise FedShopError("PSI: a truncated message")
        (size,) = struct.unpack_from(">Q", message, offset)
        offset += 8
        if offset + size > len(message):
            raise FedShopError("PSI: a truncated message")
        parts.append(message[offset : offset + size])
        offset += size
    if offset != len(message):
        raise FedShopError("PSI: a message with trailing bytes")
    return parts


class OpenminedLabel:
    """The label holder's side (client): learns the intersection."""

    def __init__(self, keys: Sequence[str]):
        self._psi = load()
        self._keys = list(keys)
        self._client = self._psi.client.CreateWithNewKey(True)
        self.peer_size: int | None = None
        self._found: list[str] | None = None

    def request(self) -> bytes:
        return self._client.CreateRequest(self._keys).SerializeToString()

    def intersection(self, reply: bytes) -> list[str]:
        setup_bytes, response_bytes = _unpack(reply, 2)
        setup = self._psi.ServerSetup()
        response = self._psi.Response()
        try:
            setup.ParseFromString(setup_bytes)
            response.ParseFromString(response_bytes)
            indices = self._client.GetIntersection(setup, response)
        except Exception as error:  # protobuf and the C++ core raise their own types
            raise FedShopError(f"PSI: the feature holder's reply is malformed ({error})") from None
        self.peer_size = len(setup.raw.encrypted_elements)
        self._found = sorted(self._keys[i] for i in indices)
        return self._found

    def result(self) -> bytes:
        """The intersection for the feature holder (reveal_to="both" only)."""
        if self._found is None:
            raise FedShopError("PSI: no intersection yet to send")
        return "\n".join(self._found).encode("ascii")


class OpenminedFeature:
    """The feature holder's side (server): learns the label holder's set size, and the
    intersection only when the label holder sends it."""

    def __init__(self, keys: Sequence[str]):
        self._psi = load()
        self._keys = list(keys)
        self._server = self._psi.server.CreateWithNewKey(True)
        self.peer_size: int | None = None

    def reply(self, request: bytes) -> bytes:
        parsed = self._psi.Request()
        try:
            parsed.ParseFromString(request)
        except Exception as error:
            raise FedShopError(f"PSI: the label holder's request is malformed ({error})") from None
        self.peer_size = len(parsed.encrypted_elements)
        setup = self._server.CreateSetupMessage(
            0.0, self.peer_size, self._keys, self._psi.DataStructure.RAW
        )
        response = self._server.ProcessRequest(parsed)
        return _pack(setup.SerializeToString(), response.SerializeToString())

    def accept(self, result: bytes) -> list[str]:
        """The intersection the label holder sent; every id in it must be one of ours."""
        found = [k for k in result.decode("ascii", errors="replace").split("\n") if k]
        own = set(self._keys)
        if any(k not in own for k in found):
            raise FedShopError("PSI: the label holder's result names ids this party does not hold")
        return sorted(found)
