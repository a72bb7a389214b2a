"""The run folder's audit log: the federated run's rounds, closed with the weights files.

Both run folders' writers (a recommendation run's `write_run`, a fit run's `write_fit_run`) call
`write_audit` with the bytes of every weights file they wrote. Each silo's private
files (its `models/federated/silo-<slug>.safetensors` and `.customers.npz`) are recorded in a
`silo-files` entry signed by that silo: in the simulator with the silo's key for the run, in a
deployment by the silo itself (its signed record came with its final reply and the server put it
in the log; it covers the weights file the silo made, the coordinator's `.customers.npz` is the
server's word). Every other weights file is
in the server's `files` entry; then the log is closed (`end`) and written as `audit.jsonl`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from fedshop.report.run_folder import federated_silo_stem
from fedshop.storage.audit import LOG_FILE, AuditLog, sha256_hex, silo_files_body

if TYPE_CHECKING:
    from fedshop.fl.audit import AuditTrail

SHARED_MODEL = "models/federated/shared.safetensors"


def silo_paths(name: str) -> tuple[str, str]:
    """A silo's private weights files in the run folder."""
    stem = federated_silo_stem(name)
    return f"models/{stem}.safetensors", f"models/{stem}.customers.npz"


def write_audit(
    out: Path, trail: AuditTrail, silo_names: Iterable[str], written: dict[str, bytes]
) -> Path:
    """Close `trail`'s log with the run's weights files (`written`: run-folder path → bytes) and
    write it as `out/audit.jsonl`; `silo_names`: the run's silos, whose files they sign."""
    # Closed on a copy: the result's log stays open, so a folder written again gets the same log.
    log = AuditLog(trail.log.server, entries=list(trail.log.entries))
    hashes = {path: sha256_hex(data) for path, data in written.items()}
    # A deployed silo's record of its weights file, signed there, came with its final reply.
    claimed = {
        path for e in log.entries if e["kind"] == "silo-files" for path in e["body"]["files"]
    }
    for name in silo_names:
        if name in trail.silos:  # a simulated silo signs its own files with its own key
            index, signer = trail.silos[name]
            mine = {p: hashes[p] for p in silo_paths(name) if p in hashes}
            log.append("silo-files", silo_files_body(signer, log.run, index, name, mine))
            claimed |= set(mine)
    rest = {path: digest for path, digest in hashes.items() if path not in claimed}
    model_file = SHARED_MODEL if SHARED_MODEL in hashes else None
    log.append("files", {"files": rest, "model_file": model_file})
    log.close()
    return log.write(out / LOG_FILE)
