"""Real deployment on Flower's deployment engine: one process per party, TLS, node authentication.

What a deployment accepts is checked here, before anything heavy is imported (the CLI answers at once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedshop.choices import PROTECTIONS
from fedshop.errors import FedShopError

if TYPE_CHECKING:
    from fedshop.config import RunConfig


def check_deployable(config: RunConfig) -> None:
    if config.model.name == "sasrec":
        raise FedShopError(
            "fedshop deploy runs the user-vector models (mf-bpr, gmf, neumf); sasrec runs in the "
            "simulator only (fedshop train)"
        )
    if config.federated.mode != "cross-silo":
        raise FedShopError(
            "fedshop deploy runs cross-silo federations (each party a process); "
            'set [federated] mode = "cross-silo"'
        )
    if config.attack.kind != "none":
        raise FedShopError(
            "[attack] is an experiment of the simulator (fedshop train); in a deployment an "
            "attacker runs its own silo code"
        )
    # No party holds a decryption key in a deployment: the protections tagged "deploy" need none.
    if config.protection.kind not in PROTECTIONS.names(tag="deploy"):
        raise FedShopError(
            f"{config.protection.kind} needs a key-holder party, which deployment does not run; "
            'use [protection] kind = "secagg" (no party holds a key), or the simulator'
        )
    if config.communication.codec != "none":
        raise FedShopError(
            f'[communication] codec = "{config.communication.codec}" is simulated only: a deployed '
            "silo sends its update as float32 Flower arrays (measured in each round's traffic); "
            "low_rank does run deployed, it is a pipeline stage"
        )
