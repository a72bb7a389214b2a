"""Every named choice a run offers, in one place: config validation, the dispatchers and the CLI's
help all read these registries, so a name is accepted, dispatched and shown from one list.

A registry maps a name to a short description and, where the name picks code, a "module:attribute"
target that is imported only when `get` asks for it: reading the lists (to validate a config or print
`--help`) imports neither torch nor dp-accounting nor a crypto library. Names without a target are
modes that the code branches on where it uses them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from fedshop.errors import ConfigError


@dataclass(frozen=True)
class Choice:
    name: str
    description: str = ""  # a few words for the help, e.g. "secure aggregation"
    target: str = ""  # "module:attribute"; empty: no code is looked up by this name
    # Where the choice works, for choices that do not work everywhere (see `Registry.names`).
    tags: frozenset[str] = frozenset()


class Registry:
    def __init__(self, label: str, *choices: Choice) -> None:
        self.label = label  # how an error names the setting
        self._choices = {choice.name: choice for choice in choices}

    def names(self, tag: str | None = None) -> tuple[str, ...]:
        """Every name, or only those tagged `tag`."""
        return tuple(c.name for c in self._choices.values() if tag is None or tag in c.tags)

    def __contains__(self, name: object) -> bool:
        return name in self._choices

    def check(self, name: str, label: str | None = None) -> Choice:
        """The choice called `name`; else a ConfigError that lists the accepted names."""
        if name not in self._choices:
            raise ConfigError(
                f"{label or self.label} must be one of {', '.join(self.names())}; got '{name}'"
            )
        return self._choices[name]

    def get(self, name: str) -> Any:
        """What `name` stands for (a class, a function, a model spec), imported now."""
        target = self.check(name).target
        if not target:
            raise LookupError(f"{self.label} '{name}' names no code")
        module, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def help(self, tag: str | None = None) -> str:
        """'a, b (what b is) or c' for command-line help."""
        shown = [self._choices[name] for name in self.names(tag)]
        items = [f"{c.name} ({c.description})" if c.description else c.name for c in shown]
        return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


_DATA = "fedshop.data.datasets"
# Each dataset's loader: (DataConfig, seed, Environment) -> RecDataset.
DATASETS = Registry(
    "dataset",
    Choice(
        "online-retail",
        "embedded; one silo per country",
        f"{_DATA}:load_online_retail",
        frozenset({"purchase-days", "item-features"}),  # [eval] cold_start needs purchase days
    ),
    Choice("movielens-1m", "", f"{_DATA}:load_movielens"),
    Choice("movielens-100k", "", f"{_DATA}:load_movielens"),
    # "item-features": public catalogue features exist (data/item_features.py; Amazon: an
    # *_item2attributes.json file next to the interactions), for models that read them.
    Choice("amazon-toys", "", f"{_DATA}:load_amazon", frozenset({"item-features"})),
    Choice("amazon-beauty", "", f"{_DATA}:load_amazon", frozenset({"item-features"})),
    Choice("amazon-sports", "", f"{_DATA}:load_amazon", frozenset({"item-features"})),
    Choice(
        "amazon-sequential",
        "with --data-path",
        f"{_DATA}:load_amazon",
        frozenset({"item-features"}),
    ),
    # "fit": size and fit feedback for --task fit (data/fit_feedback.py loads it, not a RecDataset).
    Choice("renttherunway", "fit feedback; --task fit", tags=frozenset({"fit"})),
)
# Each model's ModelSpec.
MODELS = Registry(
    "model",
    Choice("mf-bpr", "", "fedshop.models.mf:MF"),
    Choice("gmf", "", "fedshop.models.ncf:GMF"),
    Choice("neumf", "", "fedshop.models.ncf:NEUMF"),
    # "item-features": reads the dataset's item features (new products, [eval] cold_items).
    Choice(
        "mf-features",
        "MF + item-feature tower",
        "fedshop.models.features:MF_FEATURES",
        frozenset({"item-features"}),
    ),
    Choice("sasrec", "sequential; amazon-*", "fedshop.models.sasrec:SASREC"),
)
# Each rule's base pipeline: () -> AggregationPipeline.
AGGREGATIONS = Registry(
    "aggregation",
    Choice("fedavg", "example-weighted mean", "fedshop.fl.aggregation:fedavg_pipeline"),
    Choice("fednova", "normalised by local steps", "fedshop.fl.aggregation:fednova_pipeline"),
)
# Each optimiser's class, built with `from_config(FederatedConfig)`.
SERVER_OPTIMIZERS = Registry(
    "server optimizer",
    Choice("fedavg", "", "fedshop.fl.server_opt:FedAvg"),
    Choice("fedavgm", "server momentum", "fedshop.fl.server_opt:FedAvgM"),
    Choice("fedadam", "adaptive", "fedshop.fl.server_opt:FedAdam"),
    Choice("fedyogi", "adaptive, Yogi's second moment", "fedshop.fl.server_opt:FedYogi"),
)
# Each accountant's factory: () -> dp_accounting.PrivacyAccountant.
ACCOUNTANTS = Registry(
    "accountant",
    Choice("rdp", "Rényi DP", "fedshop.privacy.accounting:rdp_accountant"),
    Choice("pld", "privacy loss distributions", "fedshop.privacy.accounting:pld_accountant"),
)
# Each protection's SecureSum class, built with `from_config(ProtectionConfig)`; "none": plain sums.
# Tags: the protections that work with cross-device clients and in `fedshop deploy` (the others
# need a key-holder party).
_ANYWHERE = frozenset({"cross-device", "deploy"})
PROTECTIONS = Registry(
    "protection",
    Choice("none", "", tags=_ANYWHERE),
    Choice("secagg", "secure aggregation", "fedshop.secure.secagg:SecAggSum", _ANYWHERE),
    Choice("ckks", "homomorphic encryption; cross-silo", "fedshop.secure.ckks:CkksSum"),
    Choice("paillier", "exact encryption; cross-silo", "fedshop.secure.paillier:PaillierSum"),
)
PRIVACY_MODES = Registry(
    "privacy mode",
    Choice("none"),
    Choice("user", "each shopper; cross-device"),
    Choice("record", "each customer within a silo; cross-silo"),
)
FEDERATED_MODES = Registry(
    "federated mode",
    Choice("cross-silo", "silos are clients"),
    Choice("cross-device", "every shopper is a client"),
)
PROTOCOLS = Registry(
    "evaluation protocol",
    Choice("full", "rank the catalogue"),
    Choice("sampled-100", "rank against 100 sampled negatives"),
    Choice("ncf", "the NCF paper's MovieLens-1M test set and its 99 negatives"),
)
METHODS = Registry(
    "method",
    Choice("federated"),
    Choice("centralized", "all data pooled"),
    Choice("local_only", "each silo alone"),
    Choice("popularity"),
)

REGISTRIES: dict[str, Registry] = {
    "dataset": DATASETS,
    "model": MODELS,
    "aggregation": AGGREGATIONS,
    "server_optimizer": SERVER_OPTIMIZERS,
    "accountant": ACCOUNTANTS,
    "protection": PROTECTIONS,
    "privacy_mode": PRIVACY_MODES,
    "federated_mode": FEDERATED_MODES,
    "protocol": PROTOCOLS,
    "method": METHODS,
}


def choices(kind: str, tag: str | None = None) -> tuple[str, ...]:
    """The accepted names of one kind (see REGISTRIES), e.g. choices("protection", tag="deploy")."""
    return _registry(kind).names(tag)


def help_text(kind: str, tag: str | None = None) -> str:
    """The names of one kind with their descriptions, for command-line help."""
    return _registry(kind).help(tag)


def _registry(kind: str) -> Registry:
    if kind not in REGISTRIES:
        raise KeyError(f"no registry '{kind}'; there are: {', '.join(REGISTRIES)}")
    return REGISTRIES[kind]
