"""Sequential recommendation on the S3-Rec Amazon files, for benchmarks: `run_amazon`.

The model is `models/sasrec.py`; its training, federated (cross-device and cross-silo) and
centralized, and its evaluation are `fl/sequences.py` (read its docstring for how clients are
batched and what leaves a client); `fedshop train --model sasrec` runs them through
`experiment.run_experiment`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from fedshop.eval.metrics import summarise
from fedshop.fl.sequences import (
    SeqSettings,
    evaluate_params,
    evaluate_silos,
    popularity_scores,
    run_federated_sequences,
    train_centralized,
)

# Published SASRec on the same S3-Rec files, full ranking: the "Overall Performances" table of ICSRec
# (Qin et al., WSDM 2024; https://github.com/QinHsiu/ICSRec, README.md and performance.md). The
# table gives @5 and @20 only: HR@10 lies between H@5 and H@20.
PUBLISHED = {
    "amazon-toys": {
        "source": "ICSRec README/performance.md, SASRec column, Toys",
        "hr@5": 0.0429, "hr@20": 0.0957, "ndcg@5": 0.0245, "ndcg@20": 0.0397,
    },
    "amazon-beauty": {
        "source": "ICSRec README/performance.md, SASRec column, Beauty",
        "hr@5": 0.0377, "hr@20": 0.0894, "ndcg@5": 0.0241, "ndcg@20": 0.0386,
    },
}  # fmt: skip


def run_amazon(
    dataset: str = "amazon-toys",
    seed: int = 42,
    split: str = "test",
    mode: str = "cross-device",
    rounds: int | None = None,
    clients_per_round: int | None = None,
    epochs: int | None = None,
    data_dir: str | None = None,
    methods: Sequence[str] = ("federated", "centralized", "popularity"),
    log: Callable[[str], None] = lambda line: None,
    **settings,
) -> dict:
    """Federated SASRec, centralized SASRec and popularity on an S3-Rec Amazon file (validation item
    held out, so training sequences stop before it, as in S3-Rec/ICSRec). Returns
    {"federated sasrec": {"hr@10", "ndcg@10", …}, "centralized sasrec": {…}, "popularity": {…},
    "settings": {…}}; `settings` override SeqSettings (loss, dropout, learning_rate, …)."""
    from fedshop.config import load_config
    from fedshop.data.datasets import load_dataset

    overrides = {
        "data.dataset": dataset,
        "data.validation": True,
        "data.data_dir": data_dir,
        "model.name": "sasrec",
        "federated.mode": mode,
        "federated.rounds": rounds,
        "federated.clients_per_round": clients_per_round,
        "baselines.epochs": epochs,
        "eval.split": split,
        "seed": seed,
        "methods": list(methods),
    }
    config = load_config(None, overrides)
    data = load_dataset(config.data, seed=seed)
    chosen = SeqSettings.from_config(config, **settings)
    out: dict = {"settings": {"config": config.to_dict(), "sasrec": _plain(chosen)}}
    evaluated = int((np.diff((data.test if split == "test" else data.validation).indptr) > 0).sum())
    out["users_evaluated"], out["users"] = evaluated, data.n_users
    if "federated" in methods:
        started = time.perf_counter()
        fed = run_federated_sequences(data, config, chosen, log=log)
        out["federated sasrec"] = {**summarise(fed.final), "seconds": time.perf_counter() - started}
        out["federated curve"] = [
            {"round": r.round, **r.metrics} for r in fed.history if r.metrics is not None
        ]
    if "centralized" in methods:
        started = time.perf_counter()
        params, curve = train_centralized(
            data, chosen, seed, split, eval_every=max(1, chosen.epochs // 10), log=log
        )
        out["centralized sasrec"] = {
            **summarise(evaluate_params(params, data, split, chosen.shape.maxlen)),
            "seconds": time.perf_counter() - started,
        }
        out["centralized curve"] = [{"epoch": e, **m} for e, m in curve]
    if "popularity" in methods:
        out["popularity"] = summarise(evaluate_silos(data, split, popularity_scores(data)))
    return out


def _plain(settings: SeqSettings) -> dict:
    import dataclasses

    return _finite(dataclasses.asdict(settings))


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if not isinstance(value, dict) else {k: _finite(v) for k, v in value.items()}


__all__ = ["PUBLISHED", "run_amazon"]
