"""The round driver's audit hook: what `RoundDriver` writes into the run's audit log.

The log itself (entries, hashes, signatures, verification) is `storage/audit.py`. Here: one header
per run, one entry per round from what the transport brought back (`RoundReply.message_hashes`, the
participants' `acks`), one `final` entry with the parties' acknowledgements of the final model.
Every runtime's driver calls the same hook; the transports provide the hashes and signatures.

Cross-silo: every participant signs the hash of the model it was sent (its Ed25519 key; the
simulator makes one per silo per run, a deployment's silo holds its own). Cross-device: shoppers
hold no keys; a round's entry holds the number of participants, the sorted-hash digest of their
messages where the runtime has per-shopper messages (the vectorised simulator has none: null), the
hash of the sum and of the models, signed by the server only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedshop.models.spec import Params
from fedshop.storage.audit import (
    AuditLog,
    Signer,
    ack_message,
    digest_of_hashes,
    final_ack_message,
    message_digest,
    tensors_digest,
)

if TYPE_CHECKING:
    from fedshop.fl.rounds import RoundReply


def model_hash(shared: Params) -> str:
    return tensors_digest(shared)


def hash_message(message) -> str:
    """A `ClientMessage`'s hash (`storage.audit.message_digest`)."""
    return message_digest(
        message.tensors, message.weight, message.num_examples, message.local_steps
    )


def acknowledge(signer: Signer | None, run: str, round_number: int, shared: Params) -> str | None:
    """A party's signature on the hash of the global model it received for `round_number` (0:
    the final model), or None for a party without a key."""
    if signer is None:
        return None
    model = model_hash(shared)
    message = (
        final_ack_message(run, model)
        if round_number == 0
        else ack_message(run, round_number, model)
    )
    return signer.sign(message)


@dataclass
class RoundAudit:
    """Writes a run's rounds into `log` (whose header is already written)."""

    log: AuditLog
    cross_device: bool = False

    @property
    def run(self) -> str:
        return self.log.run

    @staticmethod
    def model_hash(shared: Params) -> str:
        return model_hash(shared)

    def round(
        self,
        round_number: int,
        reply: RoundReply,
        model_in: str,
        shared_after: Params,
        epsilon: float | None,
    ) -> dict:
        participants, hashes = reply.contributors, reply.message_hashes
        body: dict = {
            "round": round_number,
            "model_in": model_in,
            "model_out": model_hash(shared_after),
            "epsilon": epsilon,
            "sum": tensors_digest(reply.aggregate.tensors),
        }
        if self.cross_device:
            body["participants"] = len(participants)
            body["messages_digest"] = digest_of_hashes(hashes.values()) if hashes else None
        else:
            body["participants"] = sorted(int(p) for p in participants)
            body["messages"] = (
                {str(p): hashes[p] for p in sorted(participants)} if hashes is not None else None
            )
            body["acks"] = {str(p): reply.acks.get(p) for p in sorted(participants)}
            if any(reply.staleness.values()):  # FedBuff: each signed the model it trained on
                body["trained_on"] = {
                    str(p): round_number - reply.staleness.get(p, 0) for p in sorted(participants)
                }
        return self.log.append("round", body)

    def final(self, shared: Params, acks: Mapping[int, str | None]) -> dict:
        return self.log.append(
            "final",
            {"model": model_hash(shared), "acks": {str(p): s for p, s in sorted(acks.items())}},
        )


@dataclass
class AuditTrail:
    """A run's audit log from its first round to its run folder (`report/run_folder.py` closes it
    with the weights files): the server's log and, in the simulator, each simulated silo's key by
    silo name (the silo's own, used only for what that silo signs: its acknowledgements and its
    files). A deployment's trail holds no silo key: its silos' signed records of their files came
    with their final replies and are in the log already (`silo-files` entries)."""

    rounds: RoundAudit
    silos: dict[str, tuple[int, Signer]]

    @property
    def log(self) -> AuditLog:
        return self.rounds.log


def silo_weights_file(name: str) -> str:
    """A silo's private weights file in the run folder (`report.run_folder.federated_silo_stem`)."""
    from fedshop.data.partition import slug

    return f"models/federated/silo-{slug(name)}.safetensors"


def new_run_id() -> str:
    import uuid

    return uuid.uuid4().hex


def start_silo_audit(config, clients: list) -> AuditTrail:
    """The simulator's cross-silo trail: a server key and one key per silo, made for this run
    (kept in memory, never written), and the log's header with the public keys."""
    server = Signer.generate()
    silos = {}
    for client in clients:
        client.signer = Signer.generate()
        silos[client.name] = (client.index, client.signer)
    log = AuditLog(server)
    log.header(
        new_run_id(), config.to_toml(),
        {index: (name, signer.public) for name, (index, signer) in silos.items()},
        config.federated.mode,
    )  # fmt: skip
    return AuditTrail(RoundAudit(log), silos)


def start_device_audit(config) -> AuditTrail:
    """The simulator's cross-device trail: the server's key only (shoppers hold none)."""
    log = AuditLog(Signer.generate())
    log.header(new_run_id(), config.to_toml(), {}, config.federated.mode)
    return AuditTrail(RoundAudit(log, cross_device=True), {})
