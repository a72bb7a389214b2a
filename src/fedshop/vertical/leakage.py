"""What each side can learn from what crosses the cut, and the protection.

Label leakage (Li et al., ICLR 2022): a feature holder receives one gradient row per customer. The
gradient of cross-entropy with respect to the logits is p − onehot(y), so rows of the rare classes
(the model predicts "fit" for most) are longer and point elsewhere. Two scores per customer:
- norm: ‖g‖, scored against the binary label "not fit" (small or large);
- cosine: cos(g, g_ref) with the row of one customer whose class the holder knows, scored against
  "same class as the reference" (one reference per class: small vs rest, large vs rest).
Customers with one training rental only, so each row carries exactly one label.

Feature reconstruction: the label holder knows some customers' features (an auxiliary set, e.g.
customers who told it their measurements), fits a decoder from their activations to their features
and applies it to everyone else's activations; R² per numeric column (the mean predictor of the
auxiliary set scores about 0) and accuracy per categorical column against the majority class.

Protection of labels: each customer's gradient row clipped to C and N(0, (zC)²) added per
coordinate before it leaves the label holder (`Plan.gradient_clip`, `Plan.gradient_noise`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedshop.eval.auc import roc_auc
from fedshop.privacy.accounting import epsilon, gaussian_step, repeated
from fedshop.seeding import derive_seed
from fedshop.vertical.split_learning import Message, Requests, Transport


class RecordingTransport:
    """Passes every exchange through and keeps the gradients sent in backward requests (what each
    feature holder really receives), for the exchanges numbered in `keep` (all when None)."""

    def __init__(self, inner: Transport, keep: set[int] | None = None) -> None:
        self.inner, self.keep = inner, keep
        self.names = inner.names
        self.exchanges = 0
        self.gradients: list[tuple[int, str, np.ndarray, np.ndarray]] = []

    def exchange(self, requests: Requests) -> dict[str, Message]:
        self.exchanges += 1
        for name, (kind, message) in requests.items():
            if kind == "backward" and (self.keep is None or self.exchanges in self.keep):
                self.gradients.append(
                    (self.exchanges, name, message["positions"].copy(), message["gradients"].copy())
                )
        return self.inner.exchange(requests)


def single_label_customers(positions: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """Customer position → class, for customers with exactly one (training) rental."""
    unique, counts = np.unique(positions, return_counts=True)
    once = set(unique[counts == 1].tolist())
    return {int(p): int(y) for p, y in zip(positions, labels, strict=True) if int(p) in once}


def norm_attack_auc(gradients: np.ndarray, positive: np.ndarray) -> float:
    return roc_auc(np.linalg.norm(gradients, axis=1), positive)


def cosine_attack_auc(gradients: np.ndarray, positive: np.ndarray, reference: int) -> float:
    """AUC of cos(g, g[reference]) for `positive` (the reference's class), the reference left out."""
    unit = gradients / np.maximum(np.linalg.norm(gradients, axis=1, keepdims=True), 1e-12)
    scores = unit @ unit[reference]
    others = np.arange(len(gradients)) != reference
    return roc_auc(scores[others], positive[others])


def label_leakage(
    positions: np.ndarray,
    gradients: np.ndarray,
    customer_class: Mapping[int, int],
    classes: tuple[str, ...],
    seed: int = 0,
    negative: str = "fit",
) -> dict:
    """The attacks on one gradient message: norm AUC for "not `negative`", cosine AUC per other
    class with a randomly drawn reference customer of that class."""
    keep = np.array([int(p) in customer_class for p in positions])
    rows = gradients[keep].astype(np.float64)
    y = np.array([customer_class[int(p)] for p in positions[keep]], dtype=np.int64)
    out = {
        "customers": len(y),
        "norm_auc_not_" + negative: norm_attack_auc(rows, y != classes.index(negative)),
    }
    rng = np.random.default_rng(derive_seed(seed, "vertical", "attack-reference"))
    for k, name in enumerate(classes):
        if name == negative or not (y == k).any():
            continue
        reference = int(rng.choice(np.flatnonzero(y == k)))
        out[f"cosine_auc_{name}"] = cosine_attack_auc(rows, y == k, reference)
    return out


def reconstruction_attack(
    activations: np.ndarray,
    numeric: np.ndarray,
    categorical: np.ndarray,
    aux_fraction: float = 0.1,
    seed: int = 0,
    steps: int = 300,
) -> dict:
    """Decode features from activations: an MLP fitted on a random `aux_fraction` of customers
    (numeric targets standardised on the auxiliary set, missing values left out of the loss),
    scored on the rest. `numeric` is (n, k) float with NaN for missing; `categorical` (n, m) int
    codes with -1 for missing."""
    n = len(activations)
    rng = np.random.default_rng(derive_seed(seed, "vertical", "aux"))
    aux = np.zeros(n, dtype=bool)
    aux[rng.choice(n, size=max(round(aux_fraction * n), 2), replace=False)] = True
    x = torch.from_numpy(activations.astype(np.float32))
    mu, sd = x[aux].mean(0), x[aux].std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    t_mean = np.nanmean(numeric[aux], axis=0)
    t_std = np.nanstd(numeric[aux], axis=0) + 1e-9
    target = torch.from_numpy(((numeric - t_mean) / t_std).astype(np.float32))
    seen = ~torch.isnan(target)
    target = torch.nan_to_num(target)
    cards = [
        int(categorical[:, j].max()) + 1 if len(categorical) else 1
        for j in range(categorical.shape[1])
    ]
    codes = torch.from_numpy(categorical.astype(np.int64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "vertical", "decoder"))
        decoder = nn.Sequential(
            nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, numeric.shape[1] + sum(cards))
        )
    optimiser = torch.optim.Adam(decoder.parameters(), lr=1e-2, weight_decay=1e-4)
    a = torch.from_numpy(aux)
    for _ in range(steps):
        optimiser.zero_grad()
        out = decoder(x[a])
        loss = (((out[:, : numeric.shape[1]] - target[a]) ** 2) * seen[a]).sum() / seen[a].sum()
        start = numeric.shape[1]
        for j, k in enumerate(cards):
            ok = codes[a][:, j] >= 0
            if ok.any():
                loss = loss + nn.functional.cross_entropy(
                    out[:, start : start + k][ok], codes[a][:, j][ok]
                )
            start += k
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        out = decoder(x[~a]).numpy()
    result: dict = {"aux_customers": int(aux.sum()), "attacked_customers": int((~aux).sum())}
    rest = ~aux
    r2 = []
    for j in range(numeric.shape[1]):
        truth = numeric[rest, j]
        ok = np.isfinite(truth)
        guess = out[ok, j] * t_std[j] + t_mean[j]
        ss_res = float(((truth[ok] - guess) ** 2).sum())
        ss_mean = float(((truth[ok] - t_mean[j]) ** 2).sum())  # the aux mean as the predictor
        r2.append(1.0 - ss_res / ss_mean if ss_mean > 0 else float("nan"))
    result["r2"] = r2
    start = numeric.shape[1]
    accuracy, majority = [], []
    for j, k in enumerate(cards):
        truth = categorical[rest, j]
        ok = truth >= 0
        guess = out[ok, start : start + k].argmax(1)
        accuracy.append(float((guess == truth[ok]).mean()) if ok.any() else float("nan"))
        aux_codes = categorical[aux, j]
        mode = np.bincount(aux_codes[aux_codes >= 0], minlength=k).argmax()
        majority.append(float((truth[ok] == mode).mean()) if ok.any() else float("nan"))
        start += k
    result["accuracy"], result["majority_accuracy"] = accuracy, majority
    return result


def label_dp_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε for the labels of one customer's rentals against a feature holder that sees `releases`
    gradient rows of that customer, each clipped to C with N(0, (zC)²) noise. Changing the labels
    moves a clipped row by at most 2C, so each release is a Gaussian mechanism with noise
    multiplier z/2 (composed over releases by the project's RDP accountant)."""
    if noise_multiplier <= 0 or releases <= 0:
        return float("inf") if releases > 0 else 0.0
    return epsilon(repeated(gaussian_step(noise_multiplier / 2.0), releases), delta)
