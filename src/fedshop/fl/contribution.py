"""Each silo's contribution to the federated model, computed from the rounds (issue 21, item 3).

No model is retrained per subset of silos. In every round the server already holds each silo's
update; the model it would have got from a subset S of that round's participants is the previous
global model plus the server step (a copy of the server optimiser, same server stages) on the sum of
S's messages alone. The utility v(S) of a subset is the summarised metric ([contribution] utility,
NDCG@10 by default) of that model over all silos' customers, each silo evaluating it on its own
held-out data (`SiloClient.evaluate`): the server needs no data, only the silos' metric sums.

Per round, with N the round's participants:
- GTG-Shapley (Liu et al., "GTG-Shapley: Efficient and Accurate Participant Contribution Evaluation
  in Federated Learning", ACM TIST 2022): Monte-Carlo permutations of N, each started by a different
  participant in turn (guided sampling), with within-round truncation (a permutation stops once
  |v(N) − v(prefix)| is below `tolerance` times the round's gain |v(N) − v(∅)|; the rest of it
  gets zero) and between-round truncation (a
  round whose gain |v(N) − v(∅)| is below `round_tolerance` gives everyone zero);
- exact Shapley by enumerating every subset (`method = "exact"`, for a few silos: a check);
- leave-one-out: v(N) − v(N ∖ {i}), from the same cached round evaluations.
A silo's value is the sum of its per-round values. Shapley values are efficient per round: they sum
to v(N) − v(∅) (exactly for exact enumeration and for untruncated permutations; within `tolerance`
times that gain with truncation).

The functions on subsets (`exact_shapley`, `gtg_shapley`, `leave_one_out`, `value_round`) are pure:
they see the utility only as a function of a frozenset. `ContributionMeter` binds them to a run.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from fedshop.config import ContributionConfig
from fedshop.errors import FedShopError
from fedshop.eval.metrics import MetricSums, summarise
from fedshop.fl.server_opt import ServerOptimizer
from fedshop.messages import AggregationPipeline, ClientMessage, mean_of
from fedshop.models.spec import Params
from fedshop.seeding import derive_seed

Utility = Callable[[frozenset[int]], float]

# Exact enumeration evaluates 2^n subsets per round.
MAX_EXACT_PARTICIPANTS = 12


class CachedUtility:
    """v(S), evaluated at most once per subset (a round's evaluations are shared by every method)."""

    def __init__(self, value: Utility) -> None:
        self._value = value
        self.cache: dict[frozenset[int], float] = {}

    def __call__(self, subset: Iterable[int]) -> float:
        key = frozenset(subset)
        if key not in self.cache:
            self.cache[key] = float(self._value(key))
        return self.cache[key]

    @property
    def evaluations(self) -> int:
        return len(self.cache)


def exact_shapley(players: Sequence[int], utility: Utility) -> dict[int, float]:
    """Shapley values by enumerating every subset: φ_i = Σ_{S ⊆ N∖i} |S|!(n−|S|−1)!/n! ·
    (v(S ∪ i) − v(S))."""
    n = len(players)
    values = {i: 0.0 for i in players}
    for i in players:
        others = [j for j in players if j != i]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in combinations(others, size):
                values[i] += weight * (
                    utility(frozenset((*subset, i))) - utility(frozenset(subset))
                )
    return values


def leave_one_out(players: Sequence[int], utility: Utility) -> dict[int, float]:
    """v(N) − v(N ∖ {i}) for each player i."""
    full = frozenset(players)
    return {i: utility(full) - utility(full - {i}) for i in players}


@dataclass
class GtgEstimate:
    values: dict[int, float]
    permutations: int


def gtg_shapley(
    players: Sequence[int],
    utility: Utility,
    permutations: int,
    tolerance: float,
    rng: np.random.Generator,
) -> GtgEstimate:
    """GTG-Shapley's within-round estimate: the mean marginal gain of each player over
    `permutations` permutations. Permutation k starts with player (start + k) mod n (guided
    sampling: every player leads in turn, from a random start), the others follow in random order.
    A permutation is truncated once |v(N) − v(prefix)| < `tolerance` · |v(N) − v(∅)| (relative to
    the round's gain): the players after that point get a marginal gain of zero, and no more subsets
    are evaluated. Each permutation's gains then sum to the round's gain within that bound."""
    n = len(players)
    values = {i: 0.0 for i in players}
    if n == 0 or permutations <= 0:
        return GtgEstimate(values, 0)
    empty, full = utility(frozenset()), utility(frozenset(players))
    tolerance = tolerance * abs(full - empty)
    start = int(rng.integers(n))
    for k in range(permutations):
        lead = players[(start + k) % n]
        rest = [p for p in players if p != lead]
        order = [lead, *(rest[j] for j in rng.permutation(len(rest)))]
        prefix: set[int] = set()
        previous = empty
        for player in order:
            if abs(full - previous) < tolerance:
                break  # within-round truncation: the rest of this permutation adds nothing
            prefix.add(player)
            current = utility(frozenset(prefix))
            values[player] += current - previous
            previous = current
    return GtgEstimate({i: v / permutations for i, v in values.items()}, permutations)


@dataclass
class RoundContribution:
    """One round's values, by silo index."""

    round: int
    participants: list[int]
    empty: float  # v(∅): the previous global model
    full: float  # v(N): the model the round produced
    shapley: dict[int, float]
    leave_one_out: dict[int, float]
    evaluations: int  # distinct subsets evaluated this round (v(∅) and v(N) included)
    permutations: int  # GTG permutations sampled (0: exact, or the round was skipped)
    skipped: bool  # between-round truncation: |v(N) − v(∅)| below the round tolerance
    seconds: float = 0.0
    # Every subset evaluated this round and its utility (not written to metrics.json): other
    # estimators can be run on the same evaluations.
    utilities: dict[frozenset[int], float] = field(default_factory=dict)


def value_round(
    round_number: int,
    participants: Sequence[int],
    utility: CachedUtility,
    settings: ContributionConfig,
    rng: np.random.Generator,
) -> RoundContribution:
    """Shapley (GTG or exact) and leave-one-out values of one round's participants."""
    players = sorted(participants)
    empty, full = utility(frozenset()), utility(frozenset(players))
    zeros = {i: 0.0 for i in players}
    if abs(full - empty) < settings.round_tolerance:
        return RoundContribution(
            round_number, players, empty, full, zeros, dict(zeros), utility.evaluations, 0, True,
            utilities=dict(utility.cache),
        )  # fmt: skip
    permutations = 0
    if settings.method == "exact":
        shapley = exact_shapley(players, utility)
    else:
        estimate = gtg_shapley(players, utility, settings.permutations, settings.tolerance, rng)
        shapley, permutations = estimate.values, estimate.permutations
    loo = leave_one_out(players, utility)
    return RoundContribution(
        round_number, players, empty, full, shapley, loo, utility.evaluations, permutations, False,
        utilities=dict(utility.cache),
    )  # fmt: skip


def candidate(
    previous: Params,
    messages: Sequence[ClientMessage],
    pipeline: AggregationPipeline,
    optimizer: ServerOptimizer,
) -> Params:
    """The global model the server would get this round from `messages` alone: their sum through
    the pipeline's summation and server stages, then the server step on a copy of `optimizer` (its
    state before this round's step is left as it is). A subset the summation refuses (a robust rule
    given too few updates) leaves the model where it was, as would a round with no weight."""
    if not messages:
        return previous
    try:
        aggregate = pipeline.server_side(pipeline.summation(messages))
    except FedShopError:
        return previous
    if aggregate.weight <= 0:
        return previous
    device = next(iter(previous.values())).device
    delta = {k: v.to(device) for k, v in mean_of(aggregate).items()}
    return copy.deepcopy(optimizer).step(previous, delta)


def customer_sample(heldout_rows: np.ndarray, cap: int, seed: int, silo: int) -> np.ndarray | None:
    """At most `cap` of a silo's evaluated customers, drawn by the seed (None: all of them)."""
    if cap <= 0 or len(heldout_rows) <= cap:
        return None
    rng = np.random.default_rng(derive_seed(seed, "contribution", "customers", silo))
    return np.sort(rng.choice(heldout_rows, size=cap, replace=False))


def scaled(sums: MetricSums, customers: int) -> MetricSums:
    """A sample's metric sums scaled to the silo's `customers`: the silo counts with its full size."""
    if not sums.users or sums.users == customers:
        return sums
    factor = customers / sums.users
    return MetricSums({k: v * factor for k, v in sums.sums.items()}, customers)


@dataclass
class ContributionMeter:
    """Values every round of a run, from the round's accepted messages (the in-process runtime)."""

    settings: ContributionConfig
    names: list[str]  # silo names by index
    pipeline: AggregationPipeline
    optimizer: Callable[[], ServerOptimizer]  # the server's optimiser, before the round's step
    # Per silo, the metric sums of a candidate shared model on that silo's held-out customers.
    evaluate: Callable[[Params], dict[str, MetricSums]]
    split: str
    seed: int
    customers: str = "all"  # which customers the utility reads, in words (for metrics.json)
    rounds: list[RoundContribution] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.settings.method == "exact" and len(self.names) > MAX_EXACT_PARTICIPANTS:
            raise FedShopError(
                f'[contribution] method = "exact" evaluates every subset of a round\'s silos '
                f"(2^{len(self.names)} here); use it for at most {MAX_EXACT_PARTICIPANTS} silos, "
                'or method = "gtg"'
            )

    def measure(
        self, round_number: int, previous: Params, messages: dict[int, ClientMessage]
    ) -> RoundContribution:
        started = time.perf_counter()
        optimizer = self.optimizer()
        metric = self.settings.utility

        def value(subset: frozenset[int]) -> float:
            chosen = [messages[i] for i in sorted(subset)]
            model = candidate(previous, chosen, self.pipeline, optimizer)
            return float(summarise(self.evaluate(model))[metric])

        rng = np.random.default_rng(derive_seed(self.seed, "contribution", round_number))
        result = value_round(round_number, list(messages), CachedUtility(value), self.settings, rng)
        result.seconds = time.perf_counter() - started
        self.rounds.append(result)
        return result

    def block(self) -> dict:
        """metrics.json "contribution"."""
        return contribution_block(
            self.rounds, self.names, self.settings, self.split, self.customers
        )


def contribution_block(
    rounds: Sequence[RoundContribution],
    names: Sequence[str],
    settings: ContributionConfig,
    split: str,
    customers: str = "all",
) -> dict:
    """Per silo the summed Shapley and leave-one-out values and their shares (a value over the sum
    of all silos' absolute values: shares add up to 1 when every value is positive, and a harmful
    silo's share is negative), with what they were computed from and what they cost."""
    shapley = {i: 0.0 for i in range(len(names))}
    loo = {i: 0.0 for i in range(len(names))}
    taken = {i: 0 for i in range(len(names))}
    for r in rounds:
        for i in r.participants:
            shapley[i] += r.shapley[i]
            loo[i] += r.leave_one_out[i]
            taken[i] += 1
    total_shapley = sum(abs(v) for v in shapley.values())
    total_loo = sum(abs(v) for v in loo.values())
    per_silo = {
        names[i]: {
            "shapley": shapley[i],
            "shapley_share": shapley[i] / total_shapley if total_shapley else 0.0,
            "leave_one_out": loo[i],
            "leave_one_out_share": loo[i] / total_loo if total_loo else 0.0,
            "rounds": taken[i],
        }
        for i in range(len(names))
    }
    return {
        "available": True,
        "method": "exact Shapley" if settings.method == "exact" else "GTG-Shapley",
        "utility": settings.utility,
        "split": split,
        "customers": customers,
        "settings": {
            "permutations": settings.permutations,
            "tolerance": settings.tolerance,
            "round_tolerance": settings.round_tolerance,
            "customers_per_silo": settings.customers,
        },
        "rounds_valued": sum(not r.skipped for r in rounds),
        "rounds_skipped": sum(r.skipped for r in rounds),
        "evaluations": sum(r.evaluations for r in rounds),
        "permutations": sum(r.permutations for r in rounds),
        "seconds": round(sum(r.seconds for r in rounds), 3),
        "utility_gain": sum(r.full - r.empty for r in rounds),
        "per_silo": per_silo,
        "per_round": [
            {
                "round": r.round,
                "empty": r.empty,
                "full": r.full,
                "skipped": r.skipped,
                "evaluations": r.evaluations,
                "permutations": r.permutations,
                "seconds": round(r.seconds, 4),
                "shapley": {names[i]: v for i, v in r.shapley.items()},
                "leave_one_out": {names[i]: v for i, v in r.leave_one_out.items()},
            }
            for r in rounds
        ],
    }


def unavailable(reason: str) -> dict:
    """metrics.json "contribution" of a run that could not value its silos, and why."""
    return {"available": False, "reason": reason}
