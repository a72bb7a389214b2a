"""The server's side of a deployment: FedShop's federated server driving Flower's Grid.

The round is the simulator's (`fl/simulator.py`): the same `FederatedServer` samples silos, adds up
their staged updates through the same aggregation pipeline and steps the same server optimiser; each
silo trains with the same `SiloClient` in its own process (`silo_app.py`). Only the transport
differs, so a deployment and the simulator build the same model for the same seed.

Rounds and failures: a round goes to the sampled silos that are online; replies that fail or do not
arrive within `round-timeout` seconds count as dropouts, and the round is applied when at least
`min-silos` replies arrived (else it waits for silos to come back and retries it, applying
nothing). A checkpoint is written after every round; a restarted server resumes from it.

Run config (set by `fedshop deploy`, see the app's pyproject.toml): `config-path` (the run's TOML on
the server host), `out-dir` (where the server writes checkpoints and its outcome), `silos` (how many
silos the federation has), `min-silos`, `round-timeout`, `wait-timeout`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import save_file

from fedshop.config import load_config
from fedshop.deploy import wire
from fedshop.deploy.checkpoint import config_digest, load_checkpoint, save_checkpoint
from fedshop.deploy.server_secagg import SECAGG_MESSAGE, SecureRound, expected_layout
from fedshop.errors import FedShopError
from fedshop.eval.metrics import MetricSums, summarise
from fedshop.fl.simulator import RoundRecord, evaluated_after, make_server
from fedshop.fl.stages import AggregationPipeline
from fedshop.secure.protocol import ProtectionCost, ProtectionError
from fedshop.secure.stage import make_protection, round_cost, summarise_costs

_POLL_SECONDS = 0.2  # Grid.send_and_receive sleeps 3 s between polls; rounds are shorter here
_MAX_ATTEMPTS = 5  # a round that fails this often in a row stops the run


class IncompleteRoundError(FedShopError):
    """Too few silos took part in a round for it to be applied; it is retried."""


class Federation:
    """Which node serves which silo, learnt by asking the nodes, refreshed as nodes come and go."""

    def __init__(self, grid: Grid, n_silos: int, round_timeout: float, log) -> None:
        self.grid = grid
        self.log = log
        self.n_silos = n_silos
        self.round_timeout = round_timeout
        self.node_of: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.catalogue: str | None = None
        self.n_items: int | None = None
        self.dataset = ""
        self.customers: dict[int, int] = {}

    def refresh(self) -> None:
        online = set(self.grid.get_node_ids())
        self.node_of = {s: n for s, n in self.node_of.items() if n in online}
        unknown = sorted(online - set(self.node_of.values()))
        if not unknown:
            return
        hello = RecordDict()
        for reply in self.exchange({n: (hello, MessageType.QUERY) for n in unknown}, "hello"):
            info = reply.content["silo"]
            silo = int(info["silo"])
            if not 0 <= silo < self.n_silos:
                raise FedShopError(f"a node serves silo {silo}; this federation has {self.n_silos}")
            if self.catalogue is None:
                self.catalogue, self.n_items = str(info["catalogue"]), int(info["n-items"])
            elif str(info["catalogue"]) != self.catalogue:
                raise FedShopError(
                    f"silo {silo} ({info['name']}) indexes another item catalogue; every silo's "
                    "data file must come from the same catalogue"
                )
            self.node_of[silo] = reply.metadata.src_node_id
            self.names[silo] = str(info["name"])
            self.dataset = str(info["dataset"])
            self.customers[silo] = int(info["customers"])

    def metrics(self, replies: list[Message], name: str = "metrics") -> dict[str, MetricSums]:
        """The silos' metric sums in `replies`, by silo name in silo order."""
        per_silo = dict(wire.record_metrics(r.content, name) for r in replies)
        return {self.names[s]: per_silo[s] for s in sorted(per_silo)}

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if len(self.node_of) >= count:
                return
            if time.monotonic() > deadline:
                raise FedShopError(
                    f"only {len(self.node_of)} of the {count} silos needed came online within "
                    f"{timeout:.0f} s"
                )
            time.sleep(1.0)

    def exchange(self, contents: dict[int, tuple[RecordDict, str]], group: str) -> list[Message]:
        """Send each node its (content, message type); the successful replies that arrive within
        the timeout."""
        messages = [
            Message(content, dst_node_id=node, message_type=kind, group_id=group)
            for node, (content, kind) in contents.items()
        ]
        pushed = list(self.grid.push_messages(messages))
        destination = {i: m.metadata.dst_node_id for i, m in zip(pushed, messages, strict=False)}
        pending = {i for i in pushed if i}
        replies: list[Message] = []
        deadline = time.monotonic() + self.round_timeout
        while pending and time.monotonic() < deadline:
            arrived = list(self.grid.pull_messages(pending))
            pending -= {r.metadata.reply_to_message_id for r in arrived}
            replies += [r for r in arrived if not r.has_error()]
            for failed in (r for r in arrived if r.has_error()):
                # A silo's failure is its own business, but its reason helps whoever runs it.
                node = destination.get(failed.metadata.reply_to_message_id, "?")
                self.log(f"node {node} failed: {failed.error.reason.strip()[-500:]}")
            if pending:
                time.sleep(_POLL_SECONDS)
        return replies


def serve(grid: Grid, context: Context) -> None:
    settings = context.run_config
    config = load_config(Path(str(settings["config-path"])))
    toml_text = config.to_toml()
    out = Path(str(settings["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    n_silos = int(settings["silos"])
    min_silos = int(settings["min-silos"]) or n_silos
    log = _Log(out / "server.log")
    federation = Federation(grid, n_silos, float(settings["round-timeout"]), log)
    wait_timeout = float(settings["wait-timeout"])
    # Every silo at the start: the model's shape and the silos' names come from them.
    federation.wait_for(n_silos, wait_timeout)
    pipeline = AggregationPipeline.for_aggregation(config.federated.aggregation)
    server = make_server(config, federation.n_items, n_silos, pipeline)
    digest = config_digest(toml_text)
    checkpoints = out / "checkpoints"
    resumed = load_checkpoint(checkpoints, server, digest)
    history = resumed.history if resumed else []
    guard = _privacy_guard(config, federation, resumed)
    # Sent with every silo's training task; a silo builds its DP-SGD from it.
    dp_plan = json.dumps(asdict(guard.plan)) if guard is not None else None
    if resumed:
        log(f"resumed from the checkpoint after round {resumed.round}")
    layout = expected_layout(pipeline, server.shared)
    protection = make_protection(config.protection)
    costs: list[ProtectionCost] = []  # each protected round's measured cost
    attempts = 0  # failed attempts at the current round

    def settle(replies: list[Message]) -> None:
        # The last recorded round's metrics, from the silos' replies about its model.
        history[-1] = replace(history[-1], metrics=summarise(federation.metrics(replies)))
        log(f"round {history[-1].round}: HR@10 {history[-1].metrics['hr@10']:.4f}")

    while server.round < config.federated.rounds:
        round_number = server.round + 1
        started = time.perf_counter()
        # The previous round's model is evaluated by the silos in this round's exchange (before
        # they train on it): one exchange per round instead of two, and the same metrics as the
        # simulator's, whose silos evaluate with the same private state.
        pending = (
            history[-1]
            if history
            and history[-1].metrics is None
            and evaluated_after(config, history[-1].round)
            else None
        )
        before = server.sampling_state()
        chosen = server.sample_clients()
        federation.refresh()
        shared = wire.params_record(server.shared)
        if guard is not None and len(guard.history) < len(guard.plan.fixed_events) + round_number:
            # Write-ahead: the ledger holds this round's ε before any silo's message exists. A
            # retried round is not charged again (the silos send the very same messages).
            guard.release(round_number, guard.plan.round_event)
        needed = min(min_silos, len(chosen))
        try:
            online = [s for s in chosen if s in federation.node_of]
            secure = _secure_round(config, protection, layout, online)
            tasks = {}
            for silo in federation.node_of:
                if silo in chosen:
                    extra = secure.task_for(silo) if secure else {}
                    task = _task(round_number, toml_text, pending is not None, dp=dp_plan, **extra)
                    tasks[silo] = (task, MessageType.TRAIN)
                elif pending is not None:
                    tasks[silo] = (_task(pending.round, toml_text), MessageType.EVALUATE)
            contents = {
                federation.node_of[silo]: (RecordDict({"task": task, "shared": shared}), kind)
                for silo, (task, kind) in tasks.items()
            }
            replies = federation.exchange(contents, f"round-{round_number}")
            if pending is not None:
                settle(replies)
            contributors, cost = _aggregate(server, replies, secure, federation, needed, log)
        except (IncompleteRoundError, ProtectionError) as reason:
            attempts += 1
            if attempts >= _MAX_ATTEMPTS:
                raise FedShopError(
                    f"round {round_number} failed {attempts} times; the last time: {reason}"
                ) from None
            log(f"round {round_number}: {reason}; waiting for silos and trying again")
            federation.wait_for(max(min_silos, 2 if protection else 1), wait_timeout)
            # The retried round draws the same silos again.
            server.load_sampling_state(before)
            continue
        attempts = 0
        epsilon = guard.epsilon if guard is not None else None
        seconds = time.perf_counter() - started
        round_protection = None
        if cost is not None:
            costs.append(cost)
            round_protection = round_cost(cost)
        record = RoundRecord(round_number, contributors, seconds, None, epsilon, round_protection)
        history.append(record)
        save_checkpoint(checkpoints, server, history, digest, _run_id(guard))
        dropped = sorted(set(chosen) - set(contributors))
        log(
            f"round {round_number}: {len(contributors)} silos trained"
            + (f", silos {dropped} dropped out" if dropped else "")
            + f" ({record.seconds:.2f} s)"
        )
    # The last round's model, as it is and after every silo has refitted its own vectors.
    federation.wait_for(n_silos, wait_timeout)
    task = _task(server.round, toml_text, final=True)
    shared = wire.params_record(server.shared)
    contents = {
        node: (RecordDict({"task": task, "shared": shared}), MessageType.EVALUATE)
        for node in federation.node_of.values()
    }
    replies = federation.exchange(contents, "final")
    if history and history[-1].metrics is None:
        settle(replies)
    final = federation.metrics(replies, "final")
    privacy = guard.summary() if guard is not None else None
    summary = summarise_costs(config.protection.kind, costs)
    write_outcome(out, server.shared, history, final, federation.names, privacy, summary)
    save_checkpoint(checkpoints, server, history, digest, _run_id(guard))
    log(f"finished: HR@10 {summarise(final)['hr@10']:.4f}")


def _privacy_guard(config, federation: Federation, resumed):
    """Record-level DP: the run's guard, opened (the budgets checked before any training) or, after
    a restart, resumed under the same ledger run with the completed rounds composed again."""
    if not config.privacy.enabled:
        return None
    from fedshop.experiment import record_level_plan
    from fedshop.privacy.dp import PrivacyGuard

    plan = record_level_plan(config, max(federation.customers.values()))
    names = tuple(federation.names[s] for s in sorted(federation.names))
    if resumed is not None and resumed.run_id:
        return PrivacyGuard.resume(
            plan, config.privacy, federation.dataset, names, resumed.run_id, resumed.round
        )
    return PrivacyGuard.open(plan, config.privacy, federation.dataset, names)


def _secure_round(config, protection, layout, silos: list[int]) -> SecureRound | None:
    """The round's secure aggregation, or None without protection."""
    if protection is None:
        return None
    secure = SecureRound(protection, config.protection.bound, layout, silos)
    secure.start()
    return secure


def _aggregate(server, replies, secure, federation: Federation, needed: int, log):
    """Apply the round from the training replies: their updates, or (under secure aggregation)
    the sum that the remaining SecAgg steps unmask. Returns the silos in the sum and the
    protection's cost; raises `IncompleteRoundError` (or `ProtectionError` from the secure sum) when
    too few silos took part."""
    if secure is None:
        updates = dict(wire.record_update(r.content) for r in replies if "update" in r.content)
        if len(updates) < needed:
            raise IncompleteRoundError(f"{len(updates)} silos replied, {needed} needed")
        # In silo order, as the simulator adds them: the same float sums.
        server.apply([updates[s] for s in sorted(updates)])
        return sorted(updates), None
    index_of_node = {federation.node_of[s]: i for i, s in enumerate(secure.silos)}
    trained = {
        index_of_node[r.metadata.src_node_id]: r.content
        for r in replies
        if "secagg" in r.content and r.metadata.src_node_id in index_of_node
    }
    if len(trained) < max(needed, 2):
        raise IncompleteRoundError(f"{len(trained)} silos replied, {max(needed, 2)} needed")

    def exchange(step: str, contents: dict[int, RecordDict]) -> dict[int, RecordDict]:
        # By node, not by what a reply says of itself: a node is authenticated, a claim is not.
        nodes = {federation.node_of[secure.silos[i]]: i for i in contents}
        messages = {node: (contents[i], SECAGG_MESSAGE) for node, i in nodes.items()}
        replies = federation.exchange(messages, f"secagg-{step}")
        return {nodes[r.metadata.src_node_id]: r.content for r in replies}

    aggregate, contributors, cost = secure.finish(trained, exchange, needed, log)
    server.apply_sum(aggregate)
    return contributors, cost


def _run_id(guard) -> str | None:
    return guard.run_id if guard is not None else None


def _task(
    round_number: int, toml_text: str, evaluate=False, final=False, dp: str | None = None, **extra
) -> ConfigRecord:
    task = {"round": round_number, "config": toml_text, "evaluate": evaluate, "final": final}
    return ConfigRecord({**task, **({"dp-plan": dp} if dp is not None else {}), **extra})


def write_outcome(
    out: Path, shared, history: list[RoundRecord], final, names, privacy: dict | None,
    protection: dict,
) -> None:  # fmt: skip
    """What the server knows at the end: the shared model, the rounds, the silos' metric sums."""
    save_file({k: v.contiguous() for k, v in shared.items()}, str(out / "shared.safetensors"))
    outcome = {
        "history": [asdict(r) for r in history],
        "per_silo": {name: {"sums": s.sums, "users": s.users} for name, s in final.items()},
        "silo_names": [names[s] for s in sorted(names)],
        "privacy": privacy,
        "protection": protection,
    }
    (out / "outcome.json").write_text(json.dumps(outcome, indent=1) + "\n")


class _Log:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        print(stamped, flush=True)
        with self.path.open("a") as f:
            f.write(stamped + "\n")
