"""One PSI party in a process of its own: `run_psi_party` in a fresh Python.

Flower runs a party's code inside its own processes (the ServerApp, a ClientApp per message), which
keep gRPC threads and heartbeats alive; spu's link (brpc) inside such a process stopped the ClientApp
("ClientApp stopped responding"). A child process keeps the two apart. The ids and the result
travel through owner-only files in a private temporary folder, removed afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from fedshop.errors import FedShopError
from fedshop.secure.psi import PsiResult, PsiTls, run_psi_party
from fedshop.storage.private_files import write_private


def run_psi_party_isolated(
    role: str,
    ids: list,
    *,
    protocol: str,
    self_address: str,
    peer_address: str,
    reveal_to: str = "both",
    tls: PsiTls | None = None,
    timeout: float = 120.0,
) -> PsiResult:
    """`run_psi_party` in a child process; its errors come back as FedShopError."""
    with tempfile.TemporaryDirectory(prefix="fedshop-psi-party-") as folder:
        request = {
            "role": role, "ids": [str(i) for i in ids], "protocol": protocol,
            "self_address": self_address, "peer_address": peer_address, "reveal_to": reveal_to,
            "tls": None if tls is None else [str(tls.ca), str(tls.certificate), str(tls.key)],
            "timeout": timeout,
        }  # fmt: skip
        inbox, outbox = Path(folder) / "request.json", Path(folder) / "result.json"
        write_private(inbox, json.dumps(request))
        try:
            done = subprocess.run(
                [sys.executable, "-m", "fedshop.secure.psi_process", str(inbox), str(outbox)],
                capture_output=True, text=True, timeout=timeout + 60,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise FedShopError(
                f"the PSI party did not finish within {timeout + 60:.0f} s"
            ) from None
        if not outbox.exists():
            raise FedShopError(
                f"the PSI party failed (exit status {done.returncode}): "
                f"{(done.stderr or done.stdout)[-1500:]}"
            )
        result = json.loads(outbox.read_text())
    if "error" in result:
        raise FedShopError(result["error"])
    return PsiResult(**result)


def main(inbox: str, outbox: str) -> None:
    request = json.loads(Path(inbox).read_text())
    tls = PsiTls(*(Path(p) for p in request["tls"])) if request["tls"] else None
    try:
        result = run_psi_party(
            request["role"], request["ids"], protocol=request["protocol"],
            self_address=request["self_address"], peer_address=request["peer_address"],
            reveal_to=request["reveal_to"], tls=tls, timeout=float(request["timeout"]),
        )  # fmt: skip
        data = asdict(result)
        data.pop("received_wire", None)
    except FedShopError as exc:
        data = {"error": str(exc)}
    write_private(outbox, json.dumps(data))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
