"""The silo's side of a deployment: one storefront's process, its own data file and state folder.

Flower starts a fresh client process for every message, so everything a silo carries between rounds
(its private user vectors and its random streams) lives in its state folder, one file per round it
trained in. A silo that is asked to train round r starts from its state after the latest round
before r: asking twice for the same round (a restarted server) gives the same update, and a silo
that was down for some rounds resumes from where it stopped.

Each of the server's runs has a folder of its own in the state folder (`runs/<run id>`, the id the
server made for the run and sends with every task): a new run starts from nothing, never from
another run's vectors, and its DP noise comes from a secret made for that run alone, so two runs
never draw the same noise. A restarted server or silo continues the run, its state and its streams.

Node config (`flower-supernode --node-config`): `silo-data` (the silo's data file, written by
`fedshop deploy silo-data`), `state-dir` (a folder of its own) and `audit-key` (the silo's Ed25519
audit key, `fedshop deploy certs`: with it the silo signs the hash of every global model it receives
and the hash of its own final weights file, for the run's audit log; without it, it signs nothing
and the log does not verify).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedshop.config import RETAIL_TASKS, RunConfig, config_from_toml
from fedshop.deploy import timing, wire
from fedshop.deploy.silo_files import FitSiloData, TableSiloData, read_any_silo_file
from fedshop.deploy.silo_policy import (
    LEDGER_FILE,
    PolicyError,
    SiloLedger,
    SiloPolicy,
    policy_path,
)
from fedshop.deploy.silo_secagg import SecAggSilo, run_folder
from fedshop.errors import FedShopError
from fedshop.eval.fit_metrics import FitCounts
from fedshop.eval.tabular_metrics import BinaryCounts, ForecastSums
from fedshop.fl.aggregation import aggregation_pipeline
from fedshop.fl.audit import acknowledge, silo_weights_file
from fedshop.fl.client import LocalTask, SiloClient, SiloDp
from fedshop.fl.wire import with_low_rank
from fedshop.models.spec import Params
from fedshop.secure.protected_sum import flatten
from fedshop.secure.secagg import RoundSetup
from fedshop.seeding import NoiseStream, torch_generator
from fedshop.storage.audit import Signer, safetensors_bytes, sha256_hex, silo_files_body
from fedshop.storage.private_files import create_private_once, private_dir, private_writer

if TYPE_CHECKING:  # DP and its accountant load only in DP runs: every message is a new process
    from fedshop.fl.dp_local import DpSgdState
    from fedshop.fl.fit_silo import FitSiloClient
    from fedshop.fl.tabular_silo import TabularSiloClient
    from fedshop.privacy.dp import DpPlan

_STATE = re.compile(r"round-(\d+)\.pt$")


class SiloRun:
    """A silo's state for one run of the server's: the folder `runs/<run id>` of its state folder."""

    def __init__(self, state_dir: Path, task: ConfigRecord) -> None:
        self.folder = run_folder(state_dir, str(task.get("run", "")))

    def rounds(self) -> list[int]:
        """The rounds of the run this silo trained in."""
        return [int(m.group(1)) for p in self.folder.iterdir() if (m := _STATE.match(p.name))]

    def latest_before(self, round_number: int) -> dict | None:
        """The state saved after the latest round this silo trained in before `round_number`."""
        earlier = [r for r in self.rounds() if r < round_number]
        if not earlier:
            return None
        return torch.load(self.folder / f"round-{max(earlier)}.pt", weights_only=True)

    def check_inputs(self, round_number: int, inputs: str) -> None:
        """Refuse to train a round that would draw noise this silo drew before on other inputs:
        the difference of the two updates would cancel it. A round's noise comes from the state
        after the latest earlier round, so a round may be trained again only if no later one was,
        and only on the same inputs. An honest server asks a round again only in these cases (a
        retried round, a restart in the middle of a round: its checkpoint is the model it sent)."""
        later = [r for r in self.rounds() if r > round_number]
        if later:
            raise FedShopError(
                f"this silo already trained round {max(later)} of this run; training round "
                f"{round_number} now would draw noise it drew before on other inputs, refused"
            )
        path = self.folder / f"round-{round_number}.pt"
        if path.exists() and torch.load(path, weights_only=True).get("inputs") != inputs:
            raise FedShopError(
                f"round {round_number} of this run was already trained on another model or "
                "config; training it again would reuse its noise on other inputs, refused"
            )

    def save(self, round_number: int, state: dict) -> None:
        with private_writer(self.folder / f"round-{round_number}.pt") as f:
            torch.save(state, f)

    # Record-level DP. The silo's noise must be secret from the server, which knows the run's
    # seed: its random streams come from a secret made for this run in this folder, which never
    # leaves it (so a DP deployment is not bit-equal to the simulator, whose streams follow the
    # seed), and which no other run shares (a second run, or one that reuses this run's seed and
    # config, does not draw this run's noise again).

    @functools.cached_property
    def secret(self) -> bytes:
        return create_private_once(self.folder / "secret", os.urandom(32))

    def noise_stream(self, label: str) -> NoiseStream:
        """A secret stream of the run's for `label`: AES-CTR under a key derived from the run's
        secret (not a Mersenne Twister, whose state its published outputs would give away). The same
        label gives the same stream, so a retried round draws the same noise."""
        return NoiseStream(hashlib.sha256(self.secret + b"/" + label.encode()).digest())


class SiloNode:
    """A silo as the node config describes it."""

    def __init__(self, node_config: dict) -> None:
        for key in ("silo-data", "state-dir"):
            if not str(node_config.get(key, "")):
                raise FedShopError(f"the SuperNode's --node-config has no {key!r}")
        self.data, self.meta = read_any_silo_file(str(node_config["silo-data"]))
        self.index = int(self.meta["index"])
        self.state_dir = private_dir(Path(str(node_config["state-dir"])))
        self.policy = SiloPolicy.read(policy_path(Path(str(node_config["silo-data"]))))
        self.audit_key = str(node_config.get("audit-key", ""))

    @functools.cached_property
    def signer(self) -> Signer | None:
        """The silo's audit key (node config `audit-key`), or None."""
        if not self.audit_key:
            return None
        return Signer.from_pem(Path(self.audit_key).read_bytes())

    @functools.cached_property
    def ledger(self) -> SiloLedger:
        """The silo's own privacy ledger: all its runs' releases (not one per run)."""
        return SiloLedger(self.state_dir / LEDGER_FILE)

    def hello(self) -> RecordDict:
        """Who this silo is: the server maps silos to nodes and checks the catalogue agrees."""
        return RecordDict(
            {
                "silo": ConfigRecord(
                    {
                        "silo": self.index,
                        "name": self.data.name,
                        "n-items": int(self.meta["n_items"]),
                        "catalogue": self.meta["catalogue_digest"],
                        "dataset": str(self.meta["dataset"]),
                        # No customer count: the server sees the silo's size only as the noisy
                        # count it releases under DP (δ is the config's, not sized here).
                        **self._fit_shapes(),
                        **self._table_schema(),
                        # The public half of the silo's audit key, for the log's header.
                        **({"audit-key": self.signer.public} if self.signer else {}),
                    }
                )
            }
        )

    def _fit_shapes(self) -> dict[str, int]:
        """A shop's hello also gives what the fit model's shape needs (public: the catalogue's
        products and the measurement features); its digest covers both."""
        if not isinstance(self.data, FitSiloData):
            return {}
        return {
            "n-products": int(self.meta["n_products"]),
            "n-features": int(self.meta["n_features"]),
        }

    def _table_schema(self) -> dict:
        """A storefront's hello in a retail task gives the table's public schema (what it predicts,
        each categorical column's vocabulary size, how many numeric columns): the network's shape,
        never a row. Its digest covers it."""
        if not isinstance(self.data, TableSiloData):
            return {}
        return {
            "kind": self.data.kind,
            "horizon": int(self.data.horizon),
            "cardinalities": [int(c) for c in self.data.cardinalities],
            "n-numeric": len(self.data.numeric_names),
        }

    def client(
        self, config: RunConfig, run: SiloRun, before_round: int
    ) -> tuple[SiloClient | FitSiloClient | TabularSiloClient, dict | None]:
        """The silo's client (the simulator's class: `SiloClient`, `FitSiloClient` for a fit run,
        `TabularSiloClient` for a retail task) with its state in `run` after the latest round it
        trained in before `before_round`, and that round's saved DP-SGD state (or None)."""
        if config.task == "fit":
            client = self._fit_client(config)
        elif config.task in RETAIL_TASKS:
            client = self._table_client(config)
        else:
            client = self._client(config)
        state = run.latest_before(before_round)
        if state is None:
            return client, None
        client.load_state_dict(state["client"])
        return client, state.get("dp")

    def _client(self, config: RunConfig) -> SiloClient:
        if isinstance(self.data, FitSiloData | TableSiloData):
            raise FedShopError(f"this silo holds {self._holds()}; the task is a recommender's")
        return SiloClient(
            self.index, self.data, config.model, config.train,
            with_low_rank(aggregation_pipeline(config.federated.aggregation), config), config.seed,
            config.federated.client_learning_rate,
        )  # fmt: skip

    def _fit_client(self, config: RunConfig) -> FitSiloClient:
        from fedshop.fl.fit_silo import FitSiloClient, fit_pipeline

        data = self.data
        if not isinstance(data, FitSiloData):
            raise FedShopError(f"this silo holds {self._holds()}; the task is a fit run's")
        pipeline = fit_pipeline(config, private=config.privacy.enabled)
        return FitSiloClient(
            data.silo, data.product_item, data.product_size, data.measurements, config, pipeline
        )

    def _table_client(self, config: RunConfig) -> TabularSiloClient:
        """The simulator's storefront (`run_tabular_federated`) on this silo's rows: the network's
        shape from the file's schema, the task's head from the config."""
        from fedshop.fl.tabular_silo import (
            TASK_KINDS,
            TabularSiloClient,
            head_of,
            shape_of,
            tabular_pipeline,
        )

        data = self.data
        if not isinstance(data, TableSiloData):
            raise FedShopError(f"this silo holds {self._holds()}; the task is {config.task!r}")
        if data.kind != TASK_KINDS[config.task]:
            raise FedShopError(f"this silo's table is {data.kind}; {config.task!r} is not")
        schema = data.schema()
        shape = shape_of(config, schema)
        return TabularSiloClient(
            data.silo, shape, head_of(config, schema), config, tabular_pipeline(config, shape)
        )

    def _holds(self) -> str:
        if isinstance(self.data, FitSiloData):
            return "fit records"
        if isinstance(self.data, TableSiloData):
            return f"a {self.data.kind} table"
        return "purchases"

    @staticmethod
    def state_of(client: SiloClient | FitSiloClient, dp: DpSgdState | None, inputs: str) -> dict:
        """What the silo keeps after a round: its client, its DP-SGD state, and a digest of what
        the round was trained on."""
        state = {"client": client.state_dict(), "inputs": inputs}
        if dp is not None:
            state["dp"] = {
                "optimizer": dp.optimizer.state_dict(),
                **{name: getattr(dp, name).get_state() for name in dp.STREAMS},
            }
        return state

    def dp_state(self, config: RunConfig, run: SiloRun, saved: dict | None) -> DpSgdState:
        """The DP-SGD state as `saved` after an earlier round, or a fresh one from the run's
        secret."""
        from fedshop.fl.dp_local import DpSgdState, dp_learning_rate

        if config.privacy.known_noise_seed is not None:
            # Asked for reproducible noise (the run is reported "not private"): the simulator's.
            state = DpSgdState.of_run(config, self.index)
        else:
            state = DpSgdState.start(
                dp_learning_rate(config),
                {
                    "sampling": run.noise_stream("sampling"),
                    "negatives": torch_generator(
                        config.seed, "silo", self.index, "dp", "negatives"
                    ),
                    "noise": run.noise_stream("noise"),
                },
            )
        if saved is not None:
            state.optimizer.load_state_dict(saved["optimizer"])
            for name in DpSgdState.STREAMS:
                getattr(state, name).set_state(saved[name])
        return state

    def released_count(self, plan: DpPlan, run: SiloRun, config: RunConfig) -> float:
        """The silo's customer count with Gaussian noise, released once in the run (its accounting
        is the plan's fixed event) and reused as the silo's weight every round."""
        from fedshop.privacy.dp import release_silo_counts

        path = run.folder / "released-count.json"
        if not path.exists():
            seed = config.privacy.known_noise_seed
            rng = (
                run.noise_stream("count")
                if seed is None  # else the simulator's stream, asked for (a run "not private")
                else NoiseStream.from_seed(seed, "silo", self.index, "dp", "count")
            )
            count = release_silo_counts([self.data.n_users], plan, rng)[0]
            # A release like any other: in the silo's own ledger first.
            self.ledger.spend(
                f"count {run.folder.name} {count!r}", plan.fixed_events[0], self.policy,
                plan.accountant,
            )  # fmt: skip
            create_private_once(path, json.dumps({"count": float(count)}).encode())
        return float(json.loads(path.read_text())["count"])

    def _task(self, content: RecordDict, before_offset: int):
        task = content["task"]
        run = SiloRun(self.state_dir, task)
        config = config_from_toml(str(task["config"]))
        timing.mark("config")
        client, saved_dp = self.client(config, run, int(task["round"]) + before_offset)
        timing.mark("client and state")
        shared = wire.record_params(content["shared"])
        timing.mark("shared model")
        return task, run, config, client, saved_dp, shared

    def train(self, content: RecordDict) -> RecordDict:
        """Train on the received model (`_train`). A refusal by the silo's policy or own ledger is
        also said in the silo's own log; Flower reports it to the server as a failed reply."""
        try:
            return self._train(content)
        except PolicyError as reason:
            print(f"fedshop silo refused a task: {reason}", file=sys.stderr, flush=True)
            raise

    def _train(self, content: RecordDict) -> RecordDict:
        """Train on the received model; with `evaluate`, first evaluate it (the server's previous
        round) with the private state it will train from, as the simulator evaluates it."""
        task, run, config, client, saved_dp, shared = self._task(content, 0)
        round_number = int(task["round"])
        plan = None
        if "dp-plan" in task:
            from fedshop.privacy.dp import DpPlan

            plan = DpPlan(**json.loads(str(task["dp-plan"])))
        setup = RoundSetup.from_json(str(task["secagg-setup"])) if "secagg-setup" in task else None
        self.policy.check_task(plan, setup)  # before any work on the silo's data
        inputs = inputs_digest(task, shared)
        run.check_inputs(round_number, inputs)
        timing.mark("checks")
        reply = {}
        if self.signer is not None:  # the silo's word that it received this model for this round
            ack = acknowledge(self.signer, str(task.get("run", "")), round_number, shared)
            reply["audit"] = ConfigRecord({"ack": ack})
        if bool(task["evaluate"]):
            sums = client.evaluate(shared, config.eval.split)
            self._report(reply, "metrics", run, sums, task, f"round-{round_number - 1}")
            timing.mark("evaluate")
        if plan is not None:
            dp = self.dp_state(config, run, saved_dp)
            client.dp = SiloDp(dp, self.released_count(plan, run, config))
        message = client.fit(shared, LocalTask.of_run(config, plan))
        timing.mark("fit")
        update = flatten(message, 1.0)
        if message.dp_event is not None:
            # Write-ahead in the silo's own ledger: the release is recorded (or refused) before
            # the update leaves, masked or not. The same update again (a retried round) is free.
            digest = hashlib.sha256(update.tobytes()).hexdigest()
            self.ledger.spend(digest, message.dp_event, self.policy, plan.accountant)
        run.save(
            round_number, self.state_of(client, client.dp.state if client.dp else None, inputs)
        )
        timing.mark("save state")
        if setup is not None:
            # Under secure aggregation the update stays here; the reply advertises SecAgg keys.
            index, silos = int(task["secagg-index"]), task.get("secagg-silos", [])
            keys = SecAggSilo(run.folder).start(setup, index, update, round_number, silos)
            meta = wire.meta_record(self.index, message)
            return RecordDict({"meta": meta, "secagg": keys, **reply})
        return wire.update_record(self.index, message, reply)

    def evaluate(self, content: RecordDict) -> RecordDict:
        """Metric sums of this silo's customers for the model of round `round`. With `final`, also
        after refitting its private vectors to it (personalisation, kept), as the simulator does
        after the last round."""
        task, run, config, client, _, shared = self._task(content, 1)
        reply: dict = {}
        sums = client.evaluate(shared, config.eval.split)
        self._report(reply, "metrics", run, sums, task, f"round-{int(task['round'])}")
        if bool(task["final"]):
            client.personalise(shared, config.federated.personalise_epochs)
            with private_writer(run.folder / "final.pt") as f:
                torch.save(client.private_state(), f)
            sums = client.evaluate(shared, config.eval.split)
            self._report(reply, "final", run, sums, task, "final")
            if self.signer is not None:
                reply["audit"] = self._final_audit(client, str(task.get("run", "")), shared)
        return RecordDict(reply)

    def _final_audit(
        self, client: SiloClient | FitSiloClient, run: str, shared: Params
    ) -> ConfigRecord:
        """The silo's signature on the final model, and its signed record of its own weights file
        (the run folder's `models/federated/silo-<slug>.safetensors`: its private vectors and its
        users, the bytes the run folder's writer makes of them; a shop's users are its own
        customer ids, `deploy.launch.collect_fit`)."""
        if isinstance(self.data, TableSiloData):
            files = {}  # a storefront's network is all shared: it has no weights file of its own
        else:
            weights = {**client.private_state(), "users": torch.tensor(self.data.users)}
            digest = sha256_hex(safetensors_bytes(weights))
            files = {silo_weights_file(self.data.name): digest}
        body = silo_files_body(self.signer, run, self.index, self.data.name, files)
        return ConfigRecord(
            {"final-ack": acknowledge(self.signer, run, 0, shared), "files": json.dumps(body)}
        )

    def _report(self, reply: dict, name: str, run: SiloRun, sums, task, label: str) -> None:
        """Metric sums go into the reply, except under DP: exact sums over the silo's held-out
        baskets are not an accounted release, so they stay in the run's folder for the silo's own
        eyes (`metrics-<label>.json`) and nothing about them leaves."""
        private = self.policy.require_dp or "dp-plan" in task or bool(task.get("private", False))
        if not private:
            reply[name] = metrics_reply(self.index, sums)
            return
        with private_writer(run.folder / f"metrics-{label}.json") as f:
            f.write(json.dumps(kept_metrics_data(sums)).encode())


def metrics_reply(silo: int, result) -> ConfigRecord:
    """What an evaluation sends: a fit run's counts, a retail task's counts, or a recommender's
    metric sums."""
    if isinstance(result, FitCounts):
        return wire.fit_counts_config(silo, result)
    if isinstance(result, BinaryCounts | ForecastSums):
        return wire.table_counts_config(silo, result)
    return wire.metrics_config(silo, result)


def kept_metrics_data(result) -> dict:
    """What a silo keeps of an evaluation under DP, for its own eyes (`launch.kept_metrics`)."""
    if isinstance(result, FitCounts):
        return {name: value.tolist() for name, value in result.to_arrays().items()}
    return {"users": result.users, "sums": result.sums}


def inputs_digest(task: ConfigRecord, shared: Params) -> str:
    """What a round's update depends on besides the silo's own state: the round, the config, the
    DP plan and the shared model."""
    digest = hashlib.sha256()
    for key in ("round", "config", "dp-plan"):
        digest.update(f"{key}={task.get(key, '')}\n".encode())
    for name in sorted(shared):
        tensor = shared[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def handle(message: Message, context: Context, what: str) -> Message:
    timing.mark(f"handle {what}")
    node = SiloNode(dict(context.node_config))
    timing.mark("read silo file")
    if what == "hello":
        content = node.hello()
    elif what == "train":
        content = node.train(message.content)
    else:
        content = node.evaluate(message.content)
    timing.mark(f"{what} done")
    return Message(content, reply_to=message)
