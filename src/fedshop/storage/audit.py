"""The run's audit log: an append-only, hash-chained, signed record of every round (issue 21).

One JSON object per line (`audit.jsonl` in the run folder). Every entry is

    {"index": i, "prev": <hash of entry i-1>, "kind": ..., "body": {...},
     "signature": <the server's Ed25519 signature>, "hash": <sha256 of the entry without "hash">}

so removing, reordering or editing an entry breaks the chain, and the server's signature on every
entry means a rewritten chain needs the server's private key. The parties' own signatures sit in the
bodies: each participant signs the hash of every global model it receives (`ack_message`), and each
silo signs the hashes of its own private weights files (`files_message`), so the log carries the
parties' word, not only the server's.

Kinds, in order:
    header    run id, sha256 of the resolved config TOML, the server's public key, the parties and
              their public keys (cross-device: none; shoppers hold no keys), the mode
    round     round number, participants, sha256 of each received message (`message_digest`; null
              under a protection: the server receives masked values), the hash of the global model
              the participants were sent (`model_in`) and after aggregation (`model_out`), ε spent
              so far (or null), the hash of the sum, each participant's signature on `model_in`;
              cross-device: the number of participants and the sorted-hash digest of their
              messages (null where the runtime forms no per-shopper message), no signatures
    final     the hash of the final global model and the acknowledgements of the parties it was
              sent to (they refit their private vectors to it)
    silo-files one per silo: its private weights files (run-folder path → sha256), signed by it
    files     every other weights file of the run (path → sha256), the server's word
    end       the number of entries before it and the head of the chain: a log cut short lacks it

Pure functions for the canonical bytes and the hashes; `AuditLog`, a thin writer; `verify_entries`,
which returns the first bad entry; `verify_run`, which also checks the run folder's files.

Who may write the log: whoever may write the run folder (its permission bits are the boundary) can
delete or replace it. Changing it without the keys breaks a hash or a signature; but the header's
public keys are trusted on first use, so a log rewritten whole under keys of the forger's own
verifies unless the keys are checked against the parties' own (`check_party_keys`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedshop.errors import FedShopError
from fedshop.storage.private_files import create_private_once, open_private_append, write_private

SCHEMA = "fedshop-audit/1"
LOG_FILE = "audit.jsonl"
GENESIS = "0" * 64  # the `prev` of the first entry
KINDS = ("header", "round", "final", "silo-files", "files", "end")


class AuditError(FedShopError):
    """A log that cannot be read or does not verify."""


# -- canonical bytes and hashes --------------------------------------------------------------------


def canonical(value: Any) -> bytes:
    """The one byte encoding of a JSON value that every hash and signature is taken over: sorted
    keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors by name: each name, dtype, shape and its bytes (CPU, contiguous)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        header = canonical({"name": name, "dtype": str(tensor.dtype), "shape": list(tensor.shape)})
        digest.update(len(header).to_bytes(8, "big") + header)
        flat = tensor.reshape(-1)  # a 0-d tensor too; bytes as stored (little-endian here)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def message_digest(
    tensors: Mapping[str, torch.Tensor], weight: float, num_examples: float, local_steps: int
) -> str:
    """A client message's hash: its tensors, weight, example and step counts (floats exactly, in
    hexadecimal)."""
    return sha256_hex(
        canonical(
            {
                "tensors": tensors_digest(tensors),
                "weight": float(weight).hex(),
                "examples": float(num_examples).hex(),
                "steps": int(local_steps),
            }
        )
    )


def digest_of_hashes(hashes: Iterable[str]) -> str:
    """The sorted-hash digest of many messages (cross-device rounds): sha256 of the sorted hex
    hashes, one per line; given the list, anyone can recompute it and find their own hash in it."""
    return sha256_hex("\n".join(sorted(hashes)).encode())


def ack_message(run: str, round_number: int, model: str) -> bytes:
    """What a party signs when it receives a global model for a round: the run, the round and the
    model's hash (`tensors_digest`). The final model's: `final_ack_message`."""
    return f"{SCHEMA} ack\n".encode() + canonical(
        {"run": run, "round": int(round_number), "model": model}
    )


def final_ack_message(run: str, model: str) -> bytes:
    return f"{SCHEMA} final\n".encode() + canonical({"run": run, "model": model})


def files_message(run: str, party: str, files: Mapping[str, str]) -> bytes:
    """What a silo signs of its own weights files: the run, its name and path → sha256."""
    return f"{SCHEMA} files\n".encode() + canonical(
        {"run": run, "party": party, "files": dict(files)}
    )


def entry_message(entry: Mapping[str, Any]) -> bytes:
    """What the server signs of an entry: everything but its signature and hash."""
    return f"{SCHEMA} entry\n".encode() + canonical(
        {k: entry[k] for k in ("index", "prev", "kind", "body")}
    )


def entry_hash(entry: Mapping[str, Any]) -> str:
    return sha256_hex(canonical({k: v for k, v in entry.items() if k != "hash"}))


# -- keys -------------------------------------------------------------------------------------------


class Signer:
    """An Ed25519 private key: signs, and names its public key (hex of the 32 raw bytes)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> Signer:
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditError("an audit key must be an Ed25519 private key")
        return cls(key)

    @classmethod
    def of_file(cls, path: Path) -> Signer:
        """The key in `path` (PEM, PKCS#8), made there (owner-only) the first time."""
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls.from_pem(create_private_once(path, pem))

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public(self) -> str:
        return public_hex(self._key.public_key())

    def sign(self, message: bytes) -> str:
        return self._key.sign(message).hex()


def public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def write_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """An Ed25519 audit key pair, owner-only: `name.key` (private, PEM) and `name.pub` (hex of the
    raw public key)."""
    signer = Signer.generate()
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    write_private(private, signer.private_pem())
    write_private(public, signer.public + "\n")
    return private, public


def signature_valid(public: str | None, message: bytes, signature: str | None) -> bool:
    if not public or not signature:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public))
        key.verify(bytes.fromhex(signature), message)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# -- the writer ------------------------------------------------------------------------------------


class AuditLog:
    """Appends signed, chained entries; with a `path`, each entry also goes to the file at once
    (flushed and synced), so a log is never longer in memory than on disk."""

    def __init__(
        self, server: Signer, path: Path | None = None, entries: list[dict] | None = None
    ) -> None:
        self.server = server
        self.path = path
        self.entries: list[dict] = list(entries or [])

    @property
    def head(self) -> str:
        return self.entries[-1]["hash"] if self.entries else GENESIS

    @property
    def run(self) -> str:
        return self.entries[0]["body"]["run"] if self.entries else ""

    def append(self, kind: str, body: dict) -> dict:
        if kind not in KINDS:
            raise AuditError(f"unknown audit entry kind {kind!r}")
        entry: dict[str, Any] = {
            "index": len(self.entries), "prev": self.head, "kind": kind, "body": body,
        }  # fmt: skip
        entry["signature"] = self.server.sign(entry_message(entry))
        entry["hash"] = entry_hash(entry)
        canonical(entry)  # refuse NaN and anything JSON cannot say before it is written
        self.entries.append(entry)
        if self.path is not None:  # owner-only when it is created (a deployment's server folder)
            with open_private_append(self.path, "ab") as f:
                f.write(canonical(entry) + b"\n")
                f.flush()
                os.fsync(f.fileno())
        return entry

    def header(
        self, run: str, config_toml: str, parties: Mapping[int, tuple[str, str | None]], mode: str
    ) -> dict:
        """`parties`: id → (name, public key hex or None)."""
        return self.append(
            "header",
            {
                "schema": SCHEMA,
                "run": run,
                "config_sha256": sha256_hex(config_toml.encode()),
                "mode": mode,
                "server_key": self.server.public,
                "parties": [
                    {"id": int(i), "name": name, "key": key}
                    for i, (name, key) in sorted(parties.items())
                ],
            },
        )

    def close(self) -> dict:
        return self.append("end", {"entries": len(self.entries), "head": self.head})

    def write(self, path: Path) -> Path:
        """The whole log into `path`, entry by entry as canonical JSON lines, readable by all (it
        holds hashes and public keys only: anyone the run is shown to may verify it) and writable
        by its owner only. A log already there (a run written again with --overwrite) is replaced."""
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(canonical(e) + b"\n" for e in self.entries))
            f.flush()
            os.fsync(f.fileno())
        return path


def read_entries(path: Path) -> list[dict] | Problem:
    """The entries of a log file, or the first line that is not a JSON object."""
    entries = []
    with open(path, "rb") as f:
        for number, line in enumerate(f):
            try:
                entry = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                return Problem(number, "not a JSON line")
            if not isinstance(entry, dict):
                return Problem(number, "not a JSON object")
            entries.append(entry)
    return entries


WEIGHT_FILES = ("models/**/*.safetensors", "models/**/*.customers.npz")


def weight_files(folder: Path) -> list[str]:
    """Every weights file of a run folder (its path inside the folder, with /)."""
    found = {p for pattern in WEIGHT_FILES for p in folder.glob(pattern) if p.is_file()}
    return sorted(p.relative_to(folder).as_posix() for p in found)


def verify_run(folder: Path) -> Verified | Problem:
    """A run folder's log (`verify_entries`), its config.toml, and every weights file of the run:
    each one the log names, with the hash the log names, none missing; the final model file's
    tensors the last round's model. An `AuditError` for a folder without a log."""
    folder = Path(folder)
    log = folder / LOG_FILE
    if not log.is_file():
        raise AuditError(f"{folder} has no audit log ({LOG_FILE}): not a run folder, or a run "
                         "written before FedShop kept one, or a SASRec run (which keeps none yet)")  # fmt: skip
    entries = read_entries(log)
    if isinstance(entries, Problem):
        return entries
    result = verify_entries(entries)
    if isinstance(result, Problem):
        return result
    config = folder / "config.toml"
    if config.is_file() and sha256_hex(config.read_bytes()) != result.config_sha256:
        return Problem(0, "is not the configuration the log names", "config.toml")
    on_disk = weight_files(folder)
    for path in on_disk:
        if path not in result.files:
            return Problem(None, "a weights file the log does not name", path)
        if sha256_hex((folder / path).read_bytes()) != result.files[path]:
            entry, who = result.named_in[path], result.signed_by[path]
            return Problem(entry, f"its sha256 is not the one entry {entry} ({who}) names", path)
    for path in sorted(set(result.files) - set(on_disk)):
        return Problem(result.named_in[path], "named by the log but missing", path)
    if result.model_file is not None and result.final_model is not None:
        from safetensors.torch import load_file

        if tensors_digest(load_file(str(folder / result.model_file))) != result.final_model:
            return Problem(None, "its tensors are not the final model the rounds made",
                           result.model_file)  # fmt: skip
    return result


# -- verification ----------------------------------------------------------------------------------


@dataclass
class Verified:
    """What a log that verifies says: the run, its parties, its rounds and the files it names."""

    run: str
    server_key: str
    parties: dict[int, dict]
    rounds: int
    config_sha256: str
    files: dict[str, str] = field(default_factory=dict)  # run-folder path → sha256
    # path → who vouches for it: "server" or the silo's name
    signed_by: dict[str, str] = field(default_factory=dict)
    named_in: dict[str, int] = field(default_factory=dict)  # path → the entry naming it
    final_model: str | None = None
    models_in: dict[int, str] = field(default_factory=dict)  # round → the model it was sent
    acks: int = 0  # how many party signatures were checked
    head: str = GENESIS  # the hash of the entry before the one being checked
    model_file: str | None = None  # the run-folder path of the final global model's weights


@dataclass(frozen=True)
class Problem:
    entry: int | None  # the first bad entry's index (None: a file, or the log as a whole)
    reason: str
    file: str | None = None  # the bad file's run-folder path, when a file is at fault

    def __str__(self) -> str:
        if self.file is not None:
            return f"{self.file}: {self.reason}"
        where = f"entry {self.entry}" if self.entry is not None else "the log"
        return f"{where}: {self.reason}"


def verify_entries(entries: list[dict]) -> Verified | Problem:
    """Check the chain, the server's signature on every entry, the parties' signatures and that
    the rounds follow each other; the first problem found, or what the log says."""
    if not entries:
        return Problem(None, "the log is empty")
    prev, state = GENESIS, None
    for i, entry in enumerate(entries):
        problem = _check_frame(i, entry, prev)
        if problem is None:
            if i == 0:
                state = _header(entry)
                if isinstance(state, Problem):
                    return state
                problem = _check_server(i, entry, state)
            else:
                state.head = prev
                problem = _check_server(i, entry, state) or _check_body(i, entry, state)
        if problem is not None:
            return problem
        prev = entry["hash"]
        if entry["kind"] == "end":
            if i != len(entries) - 1:
                return Problem(i + 1, "an entry after the log's end")
            return state
    return Problem(len(entries), "the log has no end entry: it was cut short or never closed")


def _check_frame(i: int, entry: Any, prev: str) -> Problem | None:
    if set(entry) != {"index", "prev", "kind", "body", "signature", "hash"}:
        return Problem(i, "not an audit entry (its fields)")
    if entry["index"] != i:
        return Problem(i, f"index {entry['index']!r} where {i} belongs (removed or reordered)")
    if entry["prev"] != prev:
        return Problem(i, "does not chain to the entry before it (removed, reordered or edited)")
    if entry["kind"] not in KINDS or not isinstance(entry["body"], dict):
        return Problem(i, f"unknown kind {entry['kind']!r}")
    if (i == 0) != (entry["kind"] == "header"):
        return Problem(i, "the header must be the first entry, and only it")
    try:
        if entry_hash(entry) != entry["hash"]:
            return Problem(i, "its hash does not match its content (edited)")
    except (TypeError, ValueError):
        return Problem(i, "its content cannot be encoded canonically")
    return None


def _header(entry: dict) -> Verified | Problem:
    body = entry["body"]
    try:
        if body["schema"] != SCHEMA:
            return Problem(0, f"schema {body['schema']!r}, expected {SCHEMA!r}")
        parties = {int(p["id"]): dict(p) for p in body["parties"]}
        return Verified(
            str(body["run"]), str(body["server_key"]), parties, 0, str(body["config_sha256"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        return Problem(0, f"a malformed header ({type(exc).__name__}: {exc})")


def _check_server(i: int, entry: dict, state: Verified) -> Problem | None:
    if not signature_valid(state.server_key, entry_message(entry), entry["signature"]):
        return Problem(i, "the server's signature does not verify")
    return None


def _check_body(i: int, entry: dict, state: Verified) -> Problem | None:
    try:
        return _CHECKS[entry["kind"]](i, entry["body"], state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return Problem(i, f"a malformed {entry['kind']} entry ({type(exc).__name__}: {exc})")


def _check_acks(
    i: int, acks: Mapping[str, str], who: Iterable[int], state: Verified, message: bytes
) -> Problem | None:
    for party in who:
        info = state.parties.get(int(party))
        if info is None:
            return Problem(i, f"party {party} is not in the header")
        if not signature_valid(info.get("key"), message, acks.get(str(party))):
            return Problem(i, f"{info['name']}'s acknowledgement does not verify (or is missing)")
        state.acks += 1
    return None


def _check_round(i: int, body: dict, state: Verified) -> Problem | None:
    number = int(body["round"])
    if number != state.rounds + 1:
        return Problem(i, f"round {number} follows round {state.rounds}")
    if state.rounds and body["model_in"] != state.final_model:
        return Problem(i, f"round {number} was sent another model than round {state.rounds} made")
    participants = body["participants"]
    if isinstance(participants, list):  # cross-silo: who, their messages, their acknowledgements
        messages = body["messages"]
        if messages is not None and set(messages) != {str(p) for p in participants}:
            return Problem(i, "the message hashes are not the participants'")
        state.models_in[number] = body["model_in"]
        # FedBuff: a participant may have trained on an earlier round's model, and signed that one.
        trained_on = {int(p): int(r) for p, r in body.get("trained_on", {}).items()}
        for party in participants:
            started = trained_on.get(int(party), number)
            if started not in state.models_in or started > number:
                return Problem(i, f"party {party} trained on round {started}, which the log lacks")
            message = ack_message(state.run, started, state.models_in[started])
            problem = _check_acks(i, body["acks"], [party], state, message)
            if problem is not None:
                return problem
    elif not isinstance(participants, int):  # cross-device: a count and a digest
        return Problem(i, "participants must be a list of parties or a count")
    state.rounds, state.final_model = number, body["model_out"]
    return None


def _check_final(i: int, body: dict, state: Verified) -> Problem | None:
    if state.rounds and body["model"] != state.final_model:
        return Problem(i, "the final model is not the last round's")
    state.final_model = body["model"]
    acks = body["acks"]
    return _check_acks(
        i, acks, [int(p) for p in acks], state, final_ack_message(state.run, body["model"])
    )


def _check_silo_files(i: int, body: dict, state: Verified) -> Problem | None:
    party = int(body["party"])
    info = state.parties.get(party)
    if info is None:
        return Problem(i, f"party {party} is not in the header")
    files = {str(k): str(v) for k, v in body["files"].items()}
    if not signature_valid(
        info.get("key"), files_message(state.run, info["name"], files), body["signature"]
    ):
        return Problem(i, f"{info['name']}'s signature on its files does not verify")
    return _add_files(i, files, info["name"], state)


def _check_files(i: int, body: dict, state: Verified) -> Problem | None:
    state.model_file = body.get("model_file")
    return _add_files(i, {str(k): str(v) for k, v in body["files"].items()}, "server", state)


def _add_files(i: int, files: dict[str, str], who: str, state: Verified) -> Problem | None:
    for path in files:
        if path in state.files:
            return Problem(i, f"{path} is named twice")
        if Path(path).is_absolute() or ".." in Path(path).parts:
            return Problem(i, f"{path} is not a path inside the run folder")
    state.files.update(files)
    state.signed_by.update(dict.fromkeys(files, who))
    state.named_in.update(dict.fromkeys(files, i))
    return None


def _check_end(i: int, body: dict, state: Verified) -> Problem | None:
    if int(body["entries"]) != i:
        return Problem(i, f"the end counts {body['entries']} entries before it, there are {i}")
    if body["head"] != state.head:
        return Problem(i, "the end names another head of the chain")
    return None


_CHECKS = {
    "round": _check_round,
    "final": _check_final,
    "silo-files": _check_silo_files,
    "files": _check_files,
    "end": _check_end,
}


def silo_files_body(signer: Signer, run: str, party: int, name: str, files: Mapping[str, str]):
    """A silo's signed record of its own weights files (the body of a `silo-files` entry)."""
    files = dict(files)
    return {
        "party": int(party),
        "files": files,
        "signature": signer.sign(files_message(run, name, files)),
    }


def check_party_keys(verified: Verified, folder: Path) -> Problem | None:
    """The header's public keys against the parties' own: `audit-silo-<id>.pub` in `folder` (a
    deployment's `keys/`, or keys the silos published). Without this the header is trusted on
    first use: a log rewritten whole with keys of the forger's own verifies."""
    for party, info in sorted(verified.parties.items()):
        path = Path(folder) / f"audit-silo-{party}.pub"
        if not path.is_file():
            return Problem(0, f"no public key for {info['name']} in {folder} ({path.name})")
        if path.read_text().strip() != info.get("key"):
            return Problem(0, f"{info['name']}'s key in the header is not the one in {path}")
    return None


def safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A weights file's bytes as the run folder writes them; a silo that signs its file's hash
    makes the same bytes from the same tensors."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})
