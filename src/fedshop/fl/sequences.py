"""Sequence-aware recommendation: SASRec trained federated, centralized, and popularity, on Amazon.

Every method is scored the same way: leave-last-out, each shopper's test (or validation) item ranked
against the FULL catalogue with the shopper's own earlier items excluded (`eval/metrics.evaluate`;
before the test item that is the training items and the validation item, as S3-Rec's code zeroes
`items[:-1]`), HR@10 and NDCG@10.

Federated, cross-device (`run_federated_sequences`): every shopper is a client holding only their
own sequence. A round is the project's round (`fl/rounds.RoundDriver`): the server samples
`clients_per_round` shoppers, each trains from the current shared model on its own sequence and
sends back only its update of the shared weights, the updates are summed through the aggregation
pipeline (example-weighted FedAvg: a shopper's weight is their number of next-item predictions) and
the server optimiser (FedAdam) steps the model. What leaves a client (`client_message`): the change
of every shared tensor: the transformer's dense weights and positional embeddings in full, and the
item table. Under the cross-entropy loss the softmax normaliser gives every catalogue row a gradient,
so the item-table update is dense too; under SASRec's BCE loss only the rows the client read (its
own items, its targets and its sampled negatives) change, and those rows are the sparse part. The
sequence itself, its length and the item indices never leave the device; the update can still leak
them to a curious server (gradient inversion), which secure aggregation or DP would address and
which this model does not support yet.

How clients are batched (`SequenceTransport.train`): the round's clients are sorted by sequence
length and cut into chunks; within a chunk every sequence is left-padded to the chunk's longest.
Padding is invisible to the model (masked attention keys, zeroed rows: `models/sasrec.py`), so a
client computes the same update in any chunk.
- local_epochs = 1 (the default: one full-batch SGD step per client on its own sequence): the sum of
  the clients' example-weighted updates, Σ_c n_c·(-η ∇ mean-loss_c) = -η ∇ Σ_c sum-loss_c, is one
  backward pass over the chunk's summed loss: the same number, computed without materialising C
  copies of the item table.
- local_epochs > 1: each client's own parameters diverge, so the chunk runs `torch.func.vmap` over
  clients of a per-client function that takes `local_epochs` SGD steps with `torch.func.grad` and
  returns the client's delta (a (C, …) stack of per-client updates, then weighted and summed).
Both are checked against a plain loop over clients in tests/test_sequential.py.

Loss: full cross-entropy over the catalogue (DEFAULT_LOSS), chosen on the validation item (the
second-to-last) of Toys, never on test: on the first 4,000 Toys shoppers CE reached validation HR@10
0.053 after 30 epochs, SASRec's BCE with one sampled negative 0.032 after 30 and 0.046 after 90
(README, "Sequential recommendation"). `loss="bce"` remains available.

Cross-silo (`mode = "cross-silo"`): the shards `load_amazon` deals users into are the clients; each
silo trains with Adam on its own users' sequences for `local_epochs` epochs from the shared model and
sends its change; example-weighted FedAvg.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.config import ConfigError, RunConfig
from fedshop.data.interactions import RecDataset
from fedshop.data.sequences import UserSequences
from fedshop.eval.metrics import MetricSums, evaluate, summarise
from fedshop.fl.in_process import make_server
from fedshop.fl.rounds import FinalEvaluation, RoundDriver, RoundRecord, RoundReply
from fedshop.messages import Aggregate, AggregationPipeline, ClientMessage
from fedshop.models import sasrec
from fedshop.models.spec import Params
from fedshop.seeding import derive_seed, torch_generator

SEQUENTIAL_MODELS = ("sasrec",)
# Settings for SASRec that the run configuration does not carry (see SeqSettings).
DEFAULT_LOSS = "ce"
DEFAULT_DROPOUT = 0.2
DEFAULT_EPOCHS = 30  # centralized epochs when [baselines] epochs is 0
CHUNK_FLOATS = 1 << 24  # about this many floats of logits per chunk of clients


@dataclass(frozen=True)
class SeqSettings:
    shape: sasrec.SasRecShape = field(default_factory=sasrec.SasRecShape)
    loss: str = DEFAULT_LOSS  # "ce" (full softmax) or "bce" (SASRec's, one negative per position)
    # centralized and cross-silo: Adam
    learning_rate: float = 1e-3
    batch_size: int = 128
    epochs: int = DEFAULT_EPOCHS
    # cross-device: per-client SGD
    local_epochs: int = 1
    client_learning_rate: float = 1.0

    @staticmethod
    def from_config(config: RunConfig, **overrides) -> SeqSettings:
        settings = SeqSettings(
            shape=sasrec.SasRecShape(dim=config.model.dim, dropout=DEFAULT_DROPOUT),
            learning_rate=config.train.learning_rate,
            batch_size=config.train.batch_size,
            epochs=config.baselines.epochs or DEFAULT_EPOCHS,
            local_epochs=config.federated.local_epochs,
            client_learning_rate=config.federated.client_learning_rate,
        )
        shape_keys = {"dim", "maxlen", "blocks", "dropout"}
        shape = {k: overrides.pop(k) for k in list(overrides) if k in shape_keys}
        if shape:
            settings = replace(settings, shape=replace(settings.shape, **shape))
        return replace(settings, **overrides)


# ---------------------------------------------------------------------------------------------
# Batches of sequences


def pad_left(sequences: Sequence[np.ndarray], length: int | None = None):
    """(items, mask) int64/bool tensors (B, L): each sequence right-aligned, left-padded."""
    length = length or max([len(s) for s in sequences] + [1])
    items = np.zeros((len(sequences), length), dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=bool)
    for row, seq in enumerate(sequences):
        if len(seq):
            items[row, length - len(seq) :] = seq
            mask[row, length - len(seq) :] = True
    return torch.from_numpy(items), torch.from_numpy(mask)


@dataclass(frozen=True)
class Examples:
    """Next-item training examples of some users: inputs s[:-1], targets s[1:], last maxlen."""

    inputs: list[np.ndarray]
    targets: list[np.ndarray]

    @staticmethod
    def of(sequences: UserSequences, users: np.ndarray, maxlen: int) -> Examples:
        inputs, targets = [], []
        for u in users:
            seq = sequences.train(int(u))
            inputs.append(seq[:-1][-maxlen:])
            targets.append(seq[1:][-maxlen:])
        return Examples(inputs, targets)

    def counts(self) -> np.ndarray:
        return np.array([len(t) for t in self.targets], dtype=np.int64)

    def batch(self, rows: Sequence[int], n_items: int, loss: str, generator: torch.Generator):
        inputs, mask = pad_left([self.inputs[r] for r in rows])
        targets, _ = pad_left([self.targets[r] for r in rows], inputs.shape[1])
        negatives = None
        if loss == "bce":  # uniform negatives, as SASRec's sampler (a collision is rare)
            negatives = torch.randint(n_items, targets.shape, generator=generator)
        return inputs, targets, mask, negatives


def trainable_users(sequences: UserSequences) -> np.ndarray:
    """Users with at least one next-item example (two training items)."""
    return np.array(
        [u for u in range(sequences.n_users) if len(sequences.train(u)) >= 2], dtype=np.int64
    )


# ---------------------------------------------------------------------------------------------
# Evaluation


def exclusion(dataset: RecDataset, split: str) -> sp.csr_matrix:
    """Items not ranked for each user: what the model read (training, and before the test item
    the validation item too)."""
    if split == "test" and dataset.validation is not None:
        return ((dataset.train + dataset.validation) > 0).astype(np.float32).tocsr()
    return dataset.train


def sequence_scorer(
    params: Params, sequences: UserSequences, split: str, maxlen: int
) -> Callable[[np.ndarray], torch.Tensor]:
    """score_rows for `eval.metrics.evaluate`: rows are user indices of `sequences`."""

    def score(rows: np.ndarray) -> torch.Tensor:
        histories = [sequences.history(int(u), split)[-maxlen:] for u in rows]
        out = []
        for start in range(0, len(rows), 512):
            items, mask = pad_left(histories[start : start + 512])
            with torch.no_grad():
                out.append(sasrec.catalogue_scores(params, items, mask))
        return torch.cat(out)

    return score


def evaluate_silos(
    dataset: RecDataset, split: str, score_users: Callable[[np.ndarray], torch.Tensor]
) -> dict[str, MetricSums]:
    """Per-silo metrics; `score_users(global user indices)` scores the whole catalogue."""
    excluded = exclusion(dataset, split)
    out = {}
    for index, name in enumerate(dataset.silo_names):
        users = np.flatnonzero(dataset.user_silo == index)
        heldout = dataset.test if split == "test" else dataset.validation
        out[name] = evaluate(
            lambda rows, users=users: score_users(users[rows]), excluded[users], heldout[users]
        )
    return out


def evaluate_params(
    params: Params, dataset: RecDataset, split: str, maxlen: int
) -> dict[str, MetricSums]:
    return evaluate_silos(dataset, split, sequence_scorer(params, dataset.sequences, split, maxlen))


def popularity_scores(dataset: RecDataset) -> Callable[[np.ndarray], torch.Tensor]:
    counts = torch.from_numpy(np.asarray(dataset.train.sum(axis=0), dtype=np.float32).ravel())
    return lambda rows: counts.expand(len(rows), -1)


# ---------------------------------------------------------------------------------------------
# Centralized (and a silo's local training): Adam over batches of sequences


def _batches(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """Random batches of similar length: shuffle, sort within windows of 16 batches, cut."""
    order = torch.randperm(len(lengths), generator=generator).numpy()
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        part = order[start : start + window]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def train_adam(
    params: Params,
    examples: Examples,
    n_items: int,
    settings: SeqSettings,
    epochs: int,
    generator: torch.Generator,
    on_epoch: Callable[[int, Params], None] | None = None,
) -> Params:
    """Adam on the per-position mean loss over batches of sequences; returns new parameters."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimiser = torch.optim.Adam(leaves.values(), lr=settings.learning_rate, betas=(0.9, 0.98))
    lengths = examples.counts()
    for epoch in range(1, epochs + 1):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))  # dropout
        for rows in _batches(lengths, settings.batch_size, generator):
            inputs, targets, mask, negatives = examples.batch(
                rows, n_items, settings.loss, generator
            )
            total, count = sasrec.sequence_loss(
                leaves, inputs, targets, mask, settings.loss, negatives, settings.shape.dropout,
                compact=True,
            )  # fmt: skip
            optimiser.zero_grad(set_to_none=True)
            (total / count).backward()
            optimiser.step()
        if on_epoch is not None:
            on_epoch(epoch, {k: v.detach() for k, v in leaves.items()})
    return {k: v.detach() for k, v in leaves.items()}


def train_centralized(
    dataset: RecDataset,
    settings: SeqSettings,
    seed: int,
    split: str = "test",
    eval_every: int = 0,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[Params, list[tuple[int, dict]]]:
    users = trainable_users(dataset.sequences)
    examples = Examples.of(dataset.sequences, users, settings.shape.maxlen)
    params = sasrec.init_params(
        dataset.n_items, settings.shape, torch_generator(seed, "centralized", "init")
    )
    curve: list[tuple[int, dict]] = []

    def on_epoch(epoch: int, current: Params) -> None:
        if eval_every and (epoch % eval_every == 0 or epoch == settings.epochs):
            metrics = summarise(evaluate_params(current, dataset, split, settings.shape.maxlen))
            curve.append((epoch, metrics))
            log(f"centralized epoch {epoch}: HR@10 {metrics['hr@10']:.4f}")

    params = train_adam(
        params, examples, dataset.n_items, settings, settings.epochs,
        torch_generator(seed, "centralized", "train"), on_epoch,
    )  # fmt: skip
    return params, curve


# ---------------------------------------------------------------------------------------------
# Cross-device: per-client updates


def client_deltas(
    params: Params,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    negatives: torch.Tensor | None,
    settings: SeqSettings,
) -> Params:
    """Every client's own update (C, …): `local_epochs` full-batch SGD steps on the client's mean
    loss, from `params`, vectorised over clients with torch.func.vmap."""
    from torch.func import grad, vmap

    lr, steps, loss = settings.client_learning_rate, settings.local_epochs, settings.loss
    dropout = settings.shape.dropout

    def one_client(p0, x, y, m, neg):
        def mean_loss(p):
            total, count = sasrec.sequence_loss(p, x, y, m, loss, neg, dropout)
            return total / count.clamp(min=1)

        p = p0
        for _ in range(steps):
            g = grad(mean_loss)(p)
            p = {k: p[k] - lr * g[k] for k in p}
        return {k: p[k] - p0[k] for k in p}

    neg = negatives if negatives is not None else torch.zeros_like(targets)  # unused by ce
    return vmap(one_client, in_dims=(None, 0, 0, 0, 0), randomness="different")(
        params, inputs, targets, mask, neg
    )


def summed_update(
    params: Params,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    negatives: torch.Tensor | None,
    settings: SeqSettings,
) -> Params:
    """Σ_c n_c · Δ_c for one local SGD step per client (Δ_c = -η ∇ mean-loss_c): by linearity
    -η ∇ Σ_c sum-loss_c, one backward pass over the chunk (see the module's docstring)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    total, _ = sasrec.sequence_loss(
        leaves, inputs, targets, mask, settings.loss, negatives, settings.shape.dropout,
        compact=True,
    )  # fmt: skip
    grads = torch.autograd.grad(total, list(leaves.values()))
    return {k: -settings.client_learning_rate * g for k, g in zip(leaves, grads, strict=True)}


def client_message(
    params: Params,
    sequence: np.ndarray,
    settings: SeqSettings,
    pipeline: AggregationPipeline,
    generator: torch.Generator | None = None,
) -> ClientMessage:
    """What one shopper's device sends after training on its own `sequence` (the reference the
    vectorised round is checked against): the update of every shared tensor, after the pipeline's
    client stages. The sequence is read here and nowhere else."""
    sequence = np.asarray(sequence)[-(settings.shape.maxlen + 1) :]
    examples = Examples([sequence[:-1]], [sequence[1:]])
    n_items = params[sasrec.ITEM_TABLE].shape[0]
    inputs, targets, mask, negatives = examples.batch(
        [0], n_items, settings.loss, generator or torch.Generator().manual_seed(0)
    )
    deltas = client_deltas(params, inputs, targets, mask, negatives, settings)
    message = ClientMessage(
        tensors={k: v[0] for k, v in deltas.items()},
        weight=1.0,
        num_examples=float(len(examples.targets[0])),
        local_steps=settings.local_epochs,
    )
    return pipeline.on_client(message)


def _chunks(lengths: np.ndarray, n_items: int) -> list[np.ndarray]:
    """Positions of clients sorted by length, cut so a chunk's logits stay near CHUNK_FLOATS."""
    order = np.argsort(lengths, kind="stable")
    chunks, start = [], 0
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        if end - start > 1 and (end - start) * longest * n_items > CHUNK_FLOATS:
            chunks.append(order[start : end - 1])
            start = end - 1
    if start < len(order):
        chunks.append(order[start:])
    return chunks


def round_sum(
    params: Params,
    examples: Examples,
    n_items: int,
    settings: SeqSettings,
    generator: torch.Generator,
    vectorised: bool | None = None,
) -> Aggregate:
    """The example-weighted sum of the clients' updates in `examples` (one client per row)."""
    counts = examples.counts()
    sums = {k: torch.zeros_like(v) for k, v in params.items()}
    one_step = settings.local_epochs == 1 if vectorised is None else not vectorised
    for chunk in _chunks(counts, n_items):
        inputs, targets, mask, negatives = examples.batch(chunk, n_items, settings.loss, generator)
        if one_step:
            update = summed_update(params, inputs, targets, mask, negatives, settings)
            for k, v in update.items():
                sums[k] += v
            continue
        deltas = client_deltas(params, inputs, targets, mask, negatives, settings)
        weights = torch.from_numpy(counts[chunk]).to(torch.float32)
        for k, delta in deltas.items():
            sums[k] += torch.tensordot(weights, delta, dims=1)
    return Aggregate(sums, float(counts.sum()), len(counts))


@dataclass
class _SequenceRounds:
    """What both sequence transports share: the data, the settings and how a model is scored."""

    dataset: RecDataset
    settings: SeqSettings
    seed: int
    split: str
    retries: bool = False  # RoundDriver: a failed round is not retried (nothing here can fail)
    client_dp_event: None = None  # no DP for sequence models (config validation refuses it)

    def evaluate(self, round_number: int, shared: Params) -> dict[str, MetricSums]:
        return evaluate_params(shared, self.dataset, self.split, self.settings.shape.maxlen)

    def finish(self, shared: Params, evaluate: int | None) -> FinalEvaluation:
        return FinalEvaluation(self.evaluate(-1, shared))

    def recover(self) -> None:
        pass


@dataclass
class SequenceTransport(_SequenceRounds):
    """Cross-device rounds of SASRec: each sampled shopper trains on its own sequence."""

    unit: str = "shoppers"

    def train(
        self, round_number: int, clients: Sequence[int], shared: Params, evaluate: int | None
    ) -> RoundReply:
        generator = torch_generator(self.seed, "devices", "round", round_number)
        torch.manual_seed(derive_seed(self.seed, "devices", "dropout", round_number))
        examples = Examples.of(
            self.dataset.sequences, np.asarray(clients, dtype=np.int64), self.settings.shape.maxlen
        )
        total = round_sum(shared, examples, self.dataset.n_items, self.settings, generator)
        return RoundReply(total, list(clients))


@dataclass
class SiloSequenceTransport(_SequenceRounds):
    """Cross-silo rounds: each silo (a shard of shoppers) trains Adam on its users' sequences."""

    unit: str = "silos"

    def train(
        self, round_number: int, clients: Sequence[int], shared: Params, evaluate: int | None
    ) -> RoundReply:
        sums = {k: torch.zeros_like(v) for k, v in shared.items()}
        weight, trainable = 0.0, set(trainable_users(self.dataset.sequences).tolist())
        for silo in clients:
            users = np.array(
                [u for u in np.flatnonzero(self.dataset.user_silo == silo) if u in trainable]
            )
            examples = Examples.of(self.dataset.sequences, users, self.settings.shape.maxlen)
            trained = train_adam(
                shared, examples, self.dataset.n_items, self.settings, self.settings.local_epochs,
                torch_generator(self.seed, "silo", silo, "round", round_number),
            )  # fmt: skip
            n = float(examples.counts().sum())
            for k in sums:
                sums[k] += n * (trained[k] - shared[k])
            weight += n
        return RoundReply(Aggregate(sums, weight, len(clients)), list(clients))


@dataclass
class FederatedSequences:
    shared: Params
    history: list[RoundRecord]
    final: dict[str, MetricSums]


def run_federated_sequences(
    dataset: RecDataset,
    config: RunConfig,
    settings: SeqSettings,
    on_round: Callable[[RoundRecord], None] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> FederatedSequences:
    if config.federated.mode == "cross-device":
        pool = torch.from_numpy(trainable_users(dataset.sequences))
        transport = SequenceTransport(dataset, settings, config.seed, config.eval.split)
    else:
        pool = torch.arange(dataset.n_silos)
        transport = SiloSequenceTransport(dataset, settings, config.seed, config.eval.split)
    # The shared model starts as SASRec's registry entry initialises it (models/sasrec.SASREC);
    # settings may change its shape, so re-initialise from the same stream.
    server = make_server(config, dataset.n_items, pool, AggregationPipeline())
    server.shared = sasrec.init_params(
        dataset.n_items, settings.shape, torch_generator(config.seed, "shared", "init")
    )
    finished = RoundDriver(config, server, transport, on_round=on_round, log=log).run_all()
    return FederatedSequences(server.shared, finished.history, finished.final.per_silo)


# ---------------------------------------------------------------------------------------------
# The methods of a sequential experiment (experiment.run_experiment wraps them)


@dataclass
class SequentialMethod:
    per_silo: dict[str, MetricSums]
    seconds: float
    curve: list[tuple[int, dict]] = field(default_factory=list)
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    history: list[RoundRecord] = field(default_factory=list)


def train_sequential(
    config: RunConfig, dataset: RecDataset, progress
) -> dict[str, SequentialMethod]:
    """Federated SASRec, centralized SASRec and popularity, as `config.methods` asks."""
    if dataset.sequences is None:
        raise ConfigError(f"{dataset.name} was loaded without its sequences")
    settings = SeqSettings.from_config(config)
    split, maxlen = config.eval.split, settings.shape.maxlen
    runs: dict[str, SequentialMethod] = {}
    if "federated" in config.methods:
        progress.start("federated", config.federated.rounds)
        started = time.perf_counter()

        def on_round(record: RoundRecord) -> None:
            note = f"HR@10 {record.metrics['hr@10']:.3f}" if record.metrics else ""
            progress.advance("federated", note)

        fed = run_federated_sequences(dataset, config, settings, on_round)
        runs["federated"] = SequentialMethod(
            fed.final, time.perf_counter() - started,
            weights={"federated/shared": fed.shared}, history=fed.history,
        )  # fmt: skip
    if "centralized" in config.methods:
        progress.start("centralized", 1)
        started = time.perf_counter()
        params, curve = train_centralized(
            dataset, settings, config.seed, split, eval_every=max(1, settings.epochs // 5)
        )
        per_silo = evaluate_params(params, dataset, split, maxlen)
        runs["centralized"] = SequentialMethod(
            per_silo, time.perf_counter() - started, curve, {"centralized": params}
        )
        progress.advance("centralized")
    if "popularity" in config.methods:
        progress.start("popularity", 1)
        started = time.perf_counter()
        per_silo = evaluate_silos(dataset, split, popularity_scores(dataset))
        runs["popularity"] = SequentialMethod(per_silo, time.perf_counter() - started)
        progress.advance("popularity")
    return runs
