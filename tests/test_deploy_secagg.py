"""Secure aggregation as deployed: the server's `SecureRound` and each silo's `SecAggSilo` (its secrets in
its state folder between steps), with the step messages handed over in this process instead of by
Flower; `test_deploy.py` runs the same over real processes."""

from __future__ import annotations

import json
import stat

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedshop.deploy.server_secagg import SecureRound
from fedshop.deploy.silo_secagg import SecAggSilo
from fedshop.fl.aggregation import aggregation_pipeline
from fedshop.fl.robust import expected_layout
from fedshop.messages import AggregationPipeline, ClientMessage
from fedshop.secure.protected_sum import flatten
from fedshop.secure.protocol import ProtectionError
from fedshop.secure.secagg import SecAggSum

SHARED = {"item_embedding": torch.zeros(40, 4), "item_bias": torch.zeros(40)}


def _messages(pipeline: AggregationPipeline, n: int) -> list[ClientMessage]:
    generator = torch.Generator().manual_seed(3)
    return [
        pipeline.on_client(
            ClientMessage(
                {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in SHARED.items()},
                1.0, float(10 + 7 * i), 1 + i,
            )
        )
        for i in range(n)
    ]  # fmt: skip


class _Round:
    """A protected round over `n` silos (silo numbers 10, 11, …) whose listed indices go silent at
    the named step."""

    def __init__(
        self, tmp_path, n: int, aggregation="fedavg", silent=None, needed=0, bound=4.0
    ) -> None:
        self.pipeline = aggregation_pipeline(aggregation)
        self.messages = _messages(self.pipeline, n)
        # Each silo's run folder: a second _Round on the same tmp_path is the same silos.
        self.silos = [SecAggSilo(tmp_path / f"silo-{i}") for i in range(n)]
        self.silent = silent or {}
        self.needed = needed
        self.steps: list[str] = []
        self.sent: dict[str, dict[int, RecordDict]] = {}  # by step, what each index was sent
        self.replies: dict[str, dict[int, RecordDict]] = {}
        layout = expected_layout(self.pipeline, SHARED)
        self.secure = SecureRound(SecAggSum(), bound, layout, [10 + i for i in range(n)])
        self.log: list[str] = []
        self.errors: list[str] = []

    def exchange(self, step: str, contents: dict[int, RecordDict]) -> dict[int, RecordDict]:
        self.steps.append(step)
        self.sent[step] = contents
        replies = self.replies[step] = {}
        for i, content in contents.items():
            if i in self.silent.get(step, ()):
                continue
            try:
                replies[i] = self.silos[i].step(content)
            except ProtectionError as error:  # Flower reports a silo's error as a failed reply
                self.errors.append(str(error))
        return replies

    def run(self, round_number: int = 1):
        self.secure.start()
        trained = {}
        for i, message in enumerate(self.messages):
            if i in self.silent.get("train", ()):
                continue
            task = self.secure.task_for(10 + i)
            assert task["secagg-index"] == i
            meta = ConfigRecord({"silo": 10 + i, "weight": float(message.weight)})
            update = flatten(message, 1.0)
            keys = self.silos[i].start(
                self.secure.setup, i, update, round_number, task["secagg-silos"]
            )
            trained[i] = RecordDict({"meta": meta, "secagg": keys})
        return self.secure.finish(trained, self.exchange, self.needed, self.log.append)


def _assert_mean_of(run: _Round, aggregate, indices) -> None:
    expected = run.pipeline.aggregate([run.messages[i] for i in indices])
    got = run.pipeline.finish(aggregate)
    for name, value in expected.items():
        # float32 tensors: the plain sum rounds at every addition, the secure one once.
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["fedavg", "fednova"])
def test_the_deployed_secure_sum_is_the_plain_sum(tmp_path, aggregation):
    run = _Round(tmp_path, 4, aggregation)
    aggregate, contributors, cost = run.run()
    assert contributors == [10, 11, 12, 13] and run.steps == ["share", "mask", "unmask"]
    _assert_mean_of(run, aggregate, range(4))
    assert cost.kind == "secagg" and len(cost.bytes_sent_per_client) == 4
    # Masked 64-bit ring entries: twice the float32 plaintext, plus keys and shares.
    assert min(cost.bytes_sent_per_client) > cost.details["plaintext_bytes_per_client"] * 2
    # Nothing secret is left behind once the round is over.
    assert all(not list(silo.folder.iterdir()) for silo in run.silos)


def test_secrets_between_steps_are_readable_by_the_silo_only(tmp_path):
    run = _Round(tmp_path, 3)
    run.secure.start()
    run.silos[0].start(run.secure.setup, 0, flatten(run.messages[0], 1.0), 1, [10, 11, 12])
    (secrets,) = run.silos[0].folder.glob("*.json")
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert '"c_key"' in secrets.read_text()


def test_a_silo_that_drops_after_sharing_keys_is_recovered(tmp_path):
    run = _Round(tmp_path, 5, silent={"mask": {2}})
    aggregate, contributors, cost = run.run()
    assert contributors == [10, 11, 13, 14]
    _assert_mean_of(run, aggregate, [0, 1, 3, 4])
    assert cost.details["dropped_after_shares"] == 1
    assert any("dropped after sharing keys" in line for line in run.log)


def test_a_silo_that_never_trained_is_left_out(tmp_path):
    run = _Round(tmp_path, 4, silent={"train": {1}})
    aggregate, contributors, cost = run.run()
    assert contributors == [10, 12, 13]
    _assert_mean_of(run, aggregate, [0, 2, 3])
    assert cost.details["dropped_before_shares"] == 1


def test_too_few_survivors_abandon_the_round_before_unmasking(tmp_path):
    run = _Round(tmp_path, 3, silent={"mask": {0}}, needed=3)
    with pytest.raises(ProtectionError, match="abandoned before unmasking"):
        run.run()
    assert "unmask" not in run.steps


def test_one_silo_alone_is_never_a_secure_round(tmp_path):
    run = _Round(tmp_path, 1)
    with pytest.raises(ProtectionError, match="at least two"):
        run.secure.start()


def test_a_step_for_an_unknown_round_is_refused(tmp_path):
    first, second = _Round(tmp_path / "a", 2), _Round(tmp_path / "b", 2)
    first.secure.start()
    second.secure.start()
    first.silos[0].start(first.secure.setup, 0, flatten(first.messages[0], 1.0), 1, [10, 11])
    # A share request for another session (a stale or forged round) finds no secrets.
    record = {"step": "share", "setup": second.secure.setup.to_json(), "index": 0, "payload": "{}"}
    with pytest.raises(ProtectionError, match="no secrets for session"):
        first.silos[0].step(RecordDict({"secagg": ConfigRecord(record)}))


def test_an_update_beyond_the_bound_is_a_clear_error(tmp_path):
    run = _Round(tmp_path, 2, bound=1e-6)
    with pytest.raises(ProtectionError, match="abandoned before unmasking"):
        run.run()
    assert len(run.errors) == 2 and all("raise [protection] bound" in e for e in run.errors)


class _Tampering(_Round):
    """A round in which silo `who`'s reply to `step` is replaced by `tamper(reply)`."""

    def __init__(self, tmp_path, n: int, who: int, step: str, tamper) -> None:
        super().__init__(tmp_path, n)
        self.who, self.step, self.tamper = who, step, tamper

    def exchange(self, step, contents):
        replies = super().exchange(step, contents)
        if step == self.step and self.who in replies:
            replies[self.who] = self.tamper(replies[self.who])
        return replies


@pytest.mark.parametrize(
    ("step", "tamper", "reason"),
    [
        # A masked vector one entry short: refused by the server's shape check.
        ("mask", lambda r: RecordDict({"masked": _short(r), "secagg": r["secagg"]}), "shape"),
        # A reply that does not decode at all.
        ("mask", lambda r: RecordDict({"secagg": r["secagg"]}), "KeyError"),
        ("share", lambda r: RecordDict({"secagg": ConfigRecord({"package": "{"})}), "JSON"),
    ],
)
def test_a_malformed_step_reply_makes_its_silo_a_dropout(tmp_path, step, tamper, reason):
    """One silo's bad reply at a step is refused with its reason; the protocol recovers it like a
    dropout, and the round sums the others."""
    run = _Tampering(tmp_path, 4, 2, step, tamper)
    aggregate, contributors, _ = run.run()
    assert contributors == [10, 11, 13]
    _assert_mean_of(run, aggregate, [0, 1, 3])
    refused = [line for line in run.log if "silo 12's message refused" in line]
    assert refused and (reason in refused[0] or reason == "JSON")


def _short(reply: RecordDict):
    from flwr.app import Array, ArrayRecord

    masked = reply["masked"]["masked"].numpy()
    return ArrayRecord({"masked": Array(masked[:-1].copy())})


def test_a_round_run_again_is_unmasked_only_for_the_same_silos(tmp_path):
    """The server restarts after unmasking round 1 and before its checkpoint, and runs round 1
    again with fresh keys: each silo masks the same update again. Were the second unmasking for
    fewer silos (as the protocol allows: silo 12 silent after sharing keys is recovered, see
    above), the difference of the two sums would be silo 12's update."""
    first = _Round(tmp_path, 5)
    aggregate, contributors, _ = first.run()
    assert contributors == [10, 11, 12, 13, 14]
    again = _Round(tmp_path, 5, silent={"mask": {2}})
    with pytest.raises(ProtectionError, match="0 shares of client"):
        again.run()
    assert len(again.errors) == 4 and all("refuses to unmask it" in e for e in again.errors)
    assert "survivors [10, 11, 12, 13, 14] (dropped [])" in again.errors[0]
    assert "survivors [10, 11, 13, 14] (dropped [12])" in again.errors[0]
    # Run again for the same silos, the round is unmasked: the same sum as the first time.
    third = _Round(tmp_path, 5)
    aggregate_again, contributors, _ = third.run()
    assert contributors == [10, 11, 12, 13, 14] and not third.errors
    for name, value in aggregate.tensors.items():
        torch.testing.assert_close(aggregate_again.tensors[name], value, rtol=0, atol=1e-6)
    # Each silo's record of the roster is owner-only.
    (record,) = (tmp_path / "silo-0" / "unmasked").iterdir()
    assert stat.S_IMODE(record.stat().st_mode) == 0o600


def test_an_unmasking_asked_again_gets_the_same_answer_or_none(tmp_path):
    """A lost reply asked for again, in the same session: the same answer for the same roster,
    a refusal for another."""
    run = _Round(tmp_path, 3)
    run.run()
    request = run.sent["unmask"][0]
    answer = str(run.replies["unmask"][0]["secagg"]["answer"])
    assert str(run.silos[0].step(request)["secagg"]["answer"]) == answer
    roster = {"survivors": [0, 1], "dropped": [2]}
    other = {**dict(request["secagg"]), "payload": json.dumps(roster)}
    with pytest.raises(ProtectionError, match="refuses to unmask it for survivors"):
        run.silos[0].step(RecordDict({"secagg": ConfigRecord(other)}))


def test_a_silo_answers_only_as_the_client_it_started_as(tmp_path):
    run = _Round(tmp_path, 3)
    run.secure.start()
    run.silos[0].start(run.secure.setup, 0, flatten(run.messages[0], 1.0), 1, [10, 11, 12])
    record = {"step": "share", "setup": run.secure.setup.to_json(), "index": 1, "payload": "{}"}
    with pytest.raises(ProtectionError, match="client 0 of the round, not 1"):
        run.silos[0].step(RecordDict({"secagg": ConfigRecord(record)}))
