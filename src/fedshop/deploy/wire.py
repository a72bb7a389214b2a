"""FedShop's messages as Flower records: what crosses the network between a silo and the server."""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedshop.eval.metrics import METRIC_NAMES, MetricSums
from fedshop.messages import ClientMessage
from fedshop.models.spec import Params


def params_record(params: Params) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in params.items()})


def record_params(record: ArrayRecord) -> Params:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def meta_record(silo: int, message: ClientMessage) -> ConfigRecord:
    """A staged message's public metadata (also sent under secure aggregation): under record-level
    DP with the event of the noise the silo added, which the server checks against its ledger."""
    meta = {
        "silo": silo,
        "weight": float(message.weight),
        "num-examples": float(message.num_examples),
        "local-steps": int(message.local_steps),
    }
    if message.dp_event is not None:
        from fedshop.privacy.accounting import event_to_data

        meta["dp-event"] = json.dumps(event_to_data(message.dp_event))
    return ConfigRecord(meta)


def record_dp_event(meta: ConfigRecord):
    """The DP event a silo's metadata declares, or None."""
    if "dp-event" not in meta:
        return None
    from fedshop.privacy.accounting import event_from_data

    return event_from_data(json.loads(str(meta["dp-event"])))


def update_record(silo: int, message: ClientMessage, extra: dict | None = None) -> RecordDict:
    """A silo's staged update: the shared-parameter tensors and the message's public metadata."""
    meta = meta_record(silo, message)
    return RecordDict({"update": params_record(message.tensors), "meta": meta, **(extra or {})})


def record_update(content: RecordDict) -> tuple[int, ClientMessage]:
    meta = content["meta"]
    message = ClientMessage(
        tensors=record_params(content["update"]),
        weight=float(meta["weight"]),
        num_examples=float(meta["num-examples"]),
        local_steps=int(meta["local-steps"]),
        dp_event=record_dp_event(meta),
    )
    return int(meta["silo"]), message


def metrics_config(silo: int, sums: MetricSums) -> ConfigRecord:
    """Only metric sums leave a silo after evaluation, never per-customer scores."""
    values = {f"sum/{k}": float(sums.sums[k]) for k in METRIC_NAMES}
    return ConfigRecord({"silo": silo, "users": sums.users, **values})


def record_metrics(content: RecordDict, name: str = "metrics") -> tuple[int, MetricSums]:
    record = content[name]
    sums = {k: float(record[f"sum/{k}"]) for k in METRIC_NAMES}
    return int(record["silo"]), MetricSums(sums, int(record["users"]))
