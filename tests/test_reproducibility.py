from fedshop.config import load_config
from fedshop.experiment import run_experiment
from fedshop.report.run_folder import metrics_document


def quick(seed):
    return load_config(
        overrides={
            "seed": seed,
            "model.dim": 8,
            "federated.rounds": 2,
            "federated.personalise_epochs": 1,
            "methods": ["federated", "centralized", "local_only", "popularity"],
        }
    )


def test_same_seed_same_numbers(retail):
    first = metrics_document(run_experiment(quick(7), retail))
    second = metrics_document(run_experiment(quick(7), retail))
    for doc in (first, second):
        for method in ("federated", "centralized", "local_only", "popularity"):
            doc[method].pop("seconds")
        for record in doc["history"]:
            record.pop("seconds")
        contribution = doc["contribution"]  # each silo's value is reproducible too, not its time
        contribution.pop("seconds")
        for record in contribution["per_round"]:
            record.pop("seconds")
    assert first == second


def test_other_seed_other_numbers(retail):
    a = run_experiment(quick(1), retail).methods["federated"].summary
    b = run_experiment(quick(2), retail).methods["federated"].summary
    assert a["ndcg@10"] != b["ndcg@10"]
