"""Which Flower node serves which silo, fixed by the operator when the silos' keys are registered.

A SuperNode proves its key to the SuperLink (node authentication); the SuperLink gives each
registered key a node id. The operator registers `silo-<i>.pub` and writes down the id it got, so the
server learns a silo from the authenticated node a reply comes from, never from what the reply says
of itself: one node cannot answer for another silo, or for several.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fedshop.errors import FedShopError
from fedshop.storage.private_files import write_private

NODES_FILE = "node-silos.json"
_KEY_NAME = re.compile(r"silo-(\d+)\.pub")


class IdentityError(FedShopError):
    """A silo-to-node map that is missing, malformed, or maps one silo or node twice."""


def silo_of_key(path: Path) -> int:
    """The silo a public key file is for, from its name `silo-<i>.pub` (as `deploy certs` writes)."""
    match = _KEY_NAME.fullmatch(Path(path).name)
    if match is None:
        raise IdentityError(f"{path}: a silo's public key file is named silo-<index>.pub")
    return int(match.group(1))


@dataclass
class SiloNodes:
    node_of: dict[int, int] = field(default_factory=dict)  # silo index → node id

    def add(self, silo: int, node: int) -> None:
        if silo in self.node_of and self.node_of[silo] != node:
            raise IdentityError(f"silo {silo} is already served by node {self.node_of[silo]}")
        if node in self.node_of.values() and self.node_of.get(silo) != node:
            raise IdentityError(f"node {node} already serves silo {self.silo_of(node)}")
        self.node_of[silo] = node

    def silo_of(self, node: int) -> int | None:
        return next((s for s, n in self.node_of.items() if n == node), None)

    def write(self, path: Path) -> None:
        # Owner-only, as everything a deployment writes: who serves which silo is the operator's.
        text = json.dumps({str(s): n for s, n in sorted(self.node_of.items())}, indent=1)
        write_private(path, text + "\n")

    @classmethod
    def read(cls, path: Path) -> SiloNodes:
        try:
            data = json.loads(Path(path).read_text())
            pairs = [(int(s), int(n)) for s, n in data.items()]
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise IdentityError(f"cannot read the silo-to-node map {path}: {exc}") from None
        nodes = cls()
        for silo, node in pairs:
            nodes.add(silo, node)
        return nodes
