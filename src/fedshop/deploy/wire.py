"""FedShop's messages as Flower records: what crosses the network between a silo and the server."""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedshop.errors import FedShopError
from fedshop.eval.fit_metrics import FitCounts
from fedshop.eval.metrics import METRIC_NAMES, MetricSums
from fedshop.eval.tabular_metrics import BINS, BinaryCounts, ForecastSums
from fedshop.fl.robust import BadMessageError, check_message
from fedshop.messages import ClientMessage
from fedshop.models.spec import Params
from fedshop.secure.protected_sum import Layout


class BadReplyError(FedShopError):
    """A silo's reply that does not decode or does not fit the round: it counts as a failed reply,
    logged with this reason, and the round goes on without it."""


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


def record_update(
    content: RecordDict, silo: int, layout: Layout, max_norm: float = 0.0
) -> ClientMessage:
    """The update in a reply from the node that serves `silo`, checked against the round's `layout`
    (names, shapes, dtypes) and for finite numbers; `BadReplyError` says what is wrong with it."""
    try:
        meta = content["meta"]
        claimed = int(meta["silo"])
        message = ClientMessage(
            tensors=record_params(content["update"]),
            weight=float(meta["weight"]),
            num_examples=float(meta["num-examples"]),
            local_steps=int(meta["local-steps"]),
            dp_event=record_dp_event(meta),
        )
    except (KeyError, TypeError, ValueError) as exc:  # what a record or JSON raises on bad input
        raise BadReplyError(f"a malformed update ({type(exc).__name__}: {exc})") from None
    if claimed != silo:
        raise BadReplyError(f"the reply claims silo {claimed}, but its node serves silo {silo}")
    try:
        check_message(message, layout, max_norm)
    except BadMessageError as reason:
        raise BadReplyError(str(reason)) from None
    return message


def record_audit(content: RecordDict, key: str) -> str | None:
    """A value of a reply's `audit` record (a silo's signature, its signed files record), or None
    when there is none: an audit record never makes a reply fail, its absence fails verification."""
    try:
        value = content["audit"][key]
    except (KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def metrics_config(silo: int, sums: MetricSums) -> ConfigRecord:
    """Only metric sums leave a silo after evaluation, never per-customer scores."""
    values = {f"sum/{k}": float(sums.sums[k]) for k in METRIC_NAMES}
    return ConfigRecord({"silo": silo, "users": sums.users, **values})


def record_metrics(content: RecordDict, silo: int, name: str = "metrics") -> MetricSums:
    """The metric sums in a reply from the node that serves `silo`."""
    try:
        record = content[name]
        claimed = int(record["silo"])
        sums = {k: float(record[f"sum/{k}"]) for k in METRIC_NAMES}
        users = int(record["users"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadReplyError(f"malformed metrics ({type(exc).__name__}: {exc})") from None
    if claimed != silo:
        raise BadReplyError(f"metrics claimed for silo {claimed} by the node of silo {silo}")
    if users < 0 or not all(math.isfinite(v) and v >= 0 for v in sums.values()):
        raise BadReplyError("metric sums must be finite and not negative")
    return MetricSums(sums, users)


def fit_counts_config(silo: int, counts: FitCounts) -> ConfigRecord:
    """Only counts leave a shop after evaluation (`eval/fit_metrics.py`), never a record's scores."""
    arrays = {name: value.ravel().tolist() for name, value in counts.to_arrays().items()}
    return ConfigRecord({"silo": silo, **arrays})


def record_fit_counts(content: RecordDict, silo: int, name: str = "metrics") -> FitCounts:
    """The fit counts in a reply from the node that serves `silo`: the shapes `FitCounts.empty`
    has, whole numbers, none negative (`BadReplyError` otherwise, as `record_metrics`)."""
    shapes = {k: v.shape for k, v in FitCounts.empty().to_arrays().items()}
    try:
        record = content[name]
        claimed = int(record["silo"])
        arrays = {k: _counts(record[k], shape) for k, shape in shapes.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise BadReplyError(f"malformed fit counts ({type(exc).__name__}: {exc})") from None
    if claimed != silo:
        raise BadReplyError(f"fit counts claimed for silo {claimed} by the node of silo {silo}")
    return FitCounts(**arrays)


def _counts(values, shape: tuple[int, ...]) -> np.ndarray:
    """`values` as non-negative int64 counts of `shape`; a ValueError says why not."""
    array = np.asarray(values)
    if array.dtype.kind not in "iu":  # floats, booleans and strings are no counts
        raise ValueError(f"counts of type {array.dtype}")
    if array.size != math.prod(shape):
        raise ValueError(f"{array.size} counts, not {math.prod(shape)} for shape {shape}")
    if (array < 0).any():
        raise ValueError("negative counts")
    return array.astype(np.int64).reshape(shape)


def table_counts_config(silo: int, counts: BinaryCounts | ForecastSums) -> ConfigRecord:
    """Only counts leave a storefront after evaluation (`eval/tabular_metrics.py`): a classifier's
    histogram of scores by label, or a forecaster's two sums; never a row's score."""
    if isinstance(counts, BinaryCounts):
        return ConfigRecord({"silo": silo, "histogram": counts.histogram.ravel().tolist()})
    values = {"absolute-error": float(counts.absolute_error), "actual": float(counts.actual)}
    return ConfigRecord({"silo": silo, **values})


def record_binary_counts(content: RecordDict, silo: int, name: str = "metrics") -> BinaryCounts:
    """A classifier's counts in a reply from the node that serves `silo`: (2, BINS) whole numbers,
    none negative (`BadReplyError` otherwise, as `record_metrics`)."""
    try:
        record = content[name]
        claimed = int(record["silo"])
        histogram = _counts(record["histogram"], (2, BINS))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadReplyError(f"malformed table counts ({type(exc).__name__}: {exc})") from None
    if claimed != silo:
        raise BadReplyError(f"table counts claimed for silo {claimed} by the node of silo {silo}")
    return BinaryCounts(histogram)


def record_forecast_sums(content: RecordDict, silo: int, name: str = "metrics") -> ForecastSums:
    """A forecaster's sums in a reply from the node that serves `silo`: two finite numbers, not
    negative (a sum of absolute errors, a sum of actual demand)."""
    try:
        record = content[name]
        claimed = int(record["silo"])
        values = [record["absolute-error"], record["actual"]]
        if not all(isinstance(v, float | int) and not isinstance(v, bool) for v in values):
            raise TypeError("sums must be numbers")
    except (KeyError, TypeError, ValueError) as exc:
        raise BadReplyError(f"malformed forecast sums ({type(exc).__name__}: {exc})") from None
    if claimed != silo:
        raise BadReplyError(f"forecast sums claimed for silo {claimed} by the node of silo {silo}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise BadReplyError("forecast sums must be finite and not negative")
    return ForecastSums(float(values[0]), float(values[1]))


def arrays_record(arrays: dict) -> ArrayRecord:
    """A vertical exchange's arrays (numbers only: customers travel as positions, never as ids)."""
    import numpy as np
    from flwr.app import Array

    record = {}
    for name, value in arrays.items():
        array = np.asarray(value)  # not ascontiguousarray: it makes a 0-d scalar 1-d
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        if array.dtype.kind not in "biuf":
            raise FedShopError(f"'{name}' is {array.dtype}: only numbers cross the cut")
        record[name] = Array(array)
    return ArrayRecord(record)


def record_arrays(record: ArrayRecord) -> dict:
    """The arrays of a vertical exchange, numbers only (`BadReplyError` otherwise)."""
    try:
        arrays = {name: value.numpy() for name, value in record.items()}
    except (TypeError, ValueError) as exc:
        raise BadReplyError(f"a malformed array ({type(exc).__name__}: {exc})") from None
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise BadReplyError(f"'{name}' is {array.dtype}: only numbers cross the cut")
    return arrays
