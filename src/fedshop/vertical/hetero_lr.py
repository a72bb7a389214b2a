"""Vertical logistic regression with Paillier-encrypted gradients, after FATE's hetero LR.

A **guest** holds the labels y and its own columns X_g; one or more **hosts** hold other columns X_h
of the same rows (aligned beforehand by private set intersection, same order); an **arbiter** holds
the Paillier private key. The model is u = X_g·w_g + Σ_h X_h·w_h; the guest's columns carry the
intercept (FATE's hosts never fit one). This is FATE 2.x's `coordinated_lr`
(python/fate/ml/glm/hetero/coordinated_lr/{guest,host,arbiter}.py in FederatedAI/FATE), itself the
protocol of Hardy et al. 2017 (arXiv:1711.10677) and Yang et al. 2019 (ACM TIST 10(2), Table 1).

The maths (FATE's, y in {-1, +1})
---------------------------------
The logistic loss is replaced by its second-order Taylor expansion at u = 0, which is what makes it
computable on Paillier ciphertexts (additions and plaintext multiplications only):

    log(1 + e^(-y·u)) ≈ log 2 - y·u/2 + u²/8
    residual d = u/4 - y/2,   gradient = X^T d / B (+ λ·w for L2, the intercept unpenalised)

per mini-batch of B rows, followed by a plain gradient step w ← w - lr·gradient.

Messages, per mini-batch (every ciphertext a project Paillier ciphertext, `pack_ciphertexts`)
----------------------------------------------------------------------------------------------
0. arbiter → guest, hosts: the public key n (once per run).
1. guest → hosts: the batch's row indices (row positions only; the alignment is already shared).
2. host → guest: [[z_h]] = [[X_h·w_h / 4]], one fresh encryption per row; with one host, also
   [[2·Σ z_h² + B·λ/2·|w_h|²]], one ciphertext, for the loss (FATE's `Xw2_h` and `h_loss`).
3. guest → hosts: [[d]] = Σ_h [[z_h]] + (X_g·w_g/4 - y/2), re-randomised (`obfuscate`) so that a
   host cannot divide out its own ciphertext and read the guest's part, which holds the labels.
4. each party → arbiter: its gradient X^T·[[d]] (ciphertext × fixed-point plaintext products, summed)
   plus a fresh encryption of a mask R drawn uniformly from Z_n, one per weight; with one host, the
   guest also sends [[B·loss]] (step 2's terms plus its own), unmasked, as FATE does.
5. arbiter → each party: the decrypted masked values (g + R) mod n; the party removes R and steps.

Who learns what (semi-honest parties, no collusion with the arbiter)
--------------------------------------------------------------------
* A host sees only ciphertexts under a key it does not hold, the batch indices, and its own
  gradient X_h^T·d / B after unmasking. It never receives labels, residuals or the guest's scores
  in plaintext (tests/test_hetero_lr.py checks every message a host receives).
* The guest sees the hosts' [[z_h]] only encrypted, and its own gradient X_g^T·d / B. Since it knows
  X_g and its own part of d, that gradient tells it X_g^T·(X_h·w_h) / 4 per batch: the known
  leakage of this protocol family (FATE's docs call it less secure than SSHE-LR for this reason).
  Likewise a host learns X_h^T·d, F_h linear combinations of the batch's residuals per step.
* The arbiter sees uniformly masked gradients (nothing) and, with one host, the Taylor loss per
  batch, as in FATE. It learns no weights.
* Collusion breaks it: an arbiter handed [[d]] by a host decrypts the residuals, hence the labels.

Where this differs from FATE 2.x
--------------------------------
* Masks. FATE's parties send their encrypted gradients to the arbiter unmasked, and the arbiter
  decrypts them and runs the optimiser (Adam, RMSprop, ...) for everyone, so it sees every gradient
  and could track every weight. Here each party masks its gradient before decryption (Hardy et al.,
  Yang et al.), so the arbiter only decrypts, and each party runs plain SGD (with optional L2)
  itself: no adaptive optimisers, which would need the gradients in the arbiter's hands.
* One host: FATE 2.x switches to a variant in which the guest also encrypts its half of d and each
  side adds its own plaintext half of the gradient; here one host runs the multi-host scheme (FATE's
  "centralized" path, and FATE 1.x's), which has the same messages' contents up to who adds which
  plaintext, and one obfuscation per row at the guest instead of one encryption per row.
* Convergence: a fixed number of epochs, no early stopping (FATE's arbiter stops on the loss or the
  weight difference). Batches are drawn by the guest from its own seed and announced to the hosts.
* Fixed point: features at 2^-23 (FATE's default `floating_point_precision`), residuals at 2^-32.
* Multi-class: FATE trains one-vs-rest; so does `train_one_vs_rest`, one binary run per class (the
  cost of a run times the number of classes). The RentTheRunway tests and benchmark use one binary
  target, "the item ran small" (a linear model separates it from the rest better than "fit", which
  lies between "small" and "large": AUC 0.67 against 0.56 in plaintext on all clean rows).

`train_plaintext` runs the same maths without encryption, on the same batches, so that its time is
the baseline for the encryption overhead and its weights the reference the encrypted run must match
up to fixed-point rounding. `time_per_epoch` measures both.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from phe.paillier import EncodedNumber, EncryptedNumber, PaillierPublicKey
from scipy.stats import rankdata

from fedshop.errors import FedShopError
from fedshop.secure.paillier import PaillierKeyHolder, pack_ciphertexts, unpack_ciphertexts

_LOG2 = math.log(2.0)
# A fixed-point value is computed in int64 before it becomes a Python integer: keep |value| < 2^62.
_INT64_BITS = 62


@dataclass(frozen=True)
class HeteroLRConfig:
    epochs: int = 3
    batch_size: int = 128  # each batch costs the arbiter one decryption per weight
    learning_rate: float = 0.5
    l2: float = 0.0  # λ: the loss gains λ/2·|w|², the intercept excepted
    key_bits: int = 2048  # FATE's default key length
    feature_bits: int = 23  # features in fixed point at 2^-23 (FATE's floating_point_precision)
    residual_bits: int = 32  # residuals (and the hosts' z) at 2^-32
    compute_loss: bool = True  # the encrypted Taylor loss, one host only (as in FATE)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise FedShopError(
                f"hetero LR needs epochs ≥ 1 and batch_size ≥ 1; got {self.epochs}, "
                f"{self.batch_size}"
            )
        if not (self.learning_rate > 0 and self.l2 >= 0):
            raise FedShopError(
                f"hetero LR needs learning_rate > 0 and l2 ≥ 0; got {self.learning_rate}, {self.l2}"
            )
        if self.key_bits < 512 or self.key_bits % 8:
            raise FedShopError(
                f"Paillier key_bits must be a multiple of 8 and at least 512; got {self.key_bits}"
            )
        if not (1 <= self.feature_bits <= 40 and 1 <= self.residual_bits <= 40):
            raise FedShopError("feature_bits and residual_bits must be 1 to 40")


# ---------------------------------------------------------------------------------------------
# The maths, in plaintext (shared by both runs)
# ---------------------------------------------------------------------------------------------


def check_inputs(
    X_guest: np.ndarray, X_hosts: Sequence[np.ndarray], y: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The parties' arrays as float64, or a `FedShopError` saying what does not line up."""
    X_guest = np.asarray(X_guest, dtype=np.float64)
    y = np.asarray(y)
    if not X_hosts:
        raise FedShopError("vertical LR needs at least one host's features")
    X_hosts = [np.asarray(X, dtype=np.float64) for X in X_hosts]
    if y.ndim != 1 or len(y) == 0:
        raise FedShopError(f"labels must be a non-empty vector; got shape {y.shape}")
    for name, X in [("guest", X_guest)] + [(f"host {i}", X) for i, X in enumerate(X_hosts)]:
        if X.ndim != 2 or X.shape[1] == 0:
            raise FedShopError(f"the {name}'s features must be a 2-D array with columns")
        if X.shape[0] != len(y):
            raise FedShopError(
                f"the {name} has {X.shape[0]} rows but the guest has {len(y)} labels: the parties' "
                f"rows must be aligned (the same rows, in the same order)"
            )
        if not np.all(np.isfinite(X)):
            raise FedShopError(f"the {name}'s features contain NaN or infinite values")
    if not np.isin(y, (0, 1)).all():
        raise FedShopError("hetero LR labels must be 0 or 1; use train_one_vs_rest for classes")
    return X_guest, X_hosts, y.astype(np.float64)


def signed_labels(y: np.ndarray) -> np.ndarray:
    """{0, 1} → {-1, +1}, FATE's labels for the Taylor loss."""
    return 2.0 * y - 1.0


def with_intercept(X: np.ndarray) -> np.ndarray:
    """The guest's columns plus a last column of ones (the guest fits the intercept)."""
    return np.hstack([X, np.ones((X.shape[0], 1))])


def epoch_batches(n_rows: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's mini-batches: a fresh permutation cut into consecutive runs."""
    order = rng.permutation(n_rows)
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def host_part(X_h: np.ndarray, w_h: np.ndarray) -> np.ndarray:
    """z_h = X_h·w_h / 4: a host's share of the residual."""
    return 0.25 * (X_h @ w_h)


def guest_part(X_g: np.ndarray, w_g: np.ndarray, y_signed: np.ndarray) -> np.ndarray:
    """X_g·w_g / 4 - y/2: the guest's share of the residual d = u/4 - y/2."""
    return 0.25 * (X_g @ w_g) - 0.5 * y_signed


def taylor_gradient(
    X: np.ndarray, d: np.ndarray, w: np.ndarray, l2: float, penalised: np.ndarray
) -> np.ndarray:
    """X^T·d / B + λ·w on the penalised weights."""
    return X.T @ d / len(d) + l2 * penalised * w


def taylor_loss(u: np.ndarray, y_signed: np.ndarray) -> float:
    """Mean of log 2 - y·u/2 + u²/8, the Taylor-approximated logistic loss."""
    return float(np.mean(_LOG2 - 0.5 * y_signed * u + 0.125 * u * u))


def l2_term(w: np.ndarray, l2: float, penalised: np.ndarray) -> float:
    return 0.5 * l2 * float(np.sum(penalised * w * w))


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    y = np.asarray(y).astype(bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        raise FedShopError("AUC needs both classes among the labels")
    ranks = rankdata(scores)
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _penalised(width: int, intercept: bool) -> np.ndarray:
    mask = np.ones(width)
    if intercept:
        mask[-1] = 0.0
    return mask


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class HeteroLRResult:
    """Trained weights and what the run cost. `w_guest`'s last entry is the intercept."""

    w_guest: np.ndarray
    w_hosts: list[np.ndarray]
    losses: list[float | None]  # the Taylor loss per epoch, mean over batches (None: not computed)
    epoch_seconds: list[float]
    bytes_per_epoch: dict[str, float] = field(default_factory=dict)  # by route, e.g. "host→guest"
    party_seconds: dict[str, float] = field(default_factory=dict)  # whole run, by party
    key_setup_seconds: float = 0.0

    def scores(self, X_guest: np.ndarray, X_hosts: Sequence[np.ndarray]) -> np.ndarray:
        """u = X_g·w_g + Σ X_h·w_h, for evaluation only. (FATE's prediction has each host send its
        X_h·w_h to the guest in plaintext; this evaluates the finished weights directly.)"""
        total = with_intercept(np.asarray(X_guest, dtype=np.float64)) @ self.w_guest
        for X_h, w_h in zip(X_hosts, self.w_hosts, strict=True):
            total = total + np.asarray(X_h, dtype=np.float64) @ w_h
        return total


def train_plaintext(
    X_guest: np.ndarray, X_hosts: Sequence[np.ndarray], y: np.ndarray, config: HeteroLRConfig
) -> HeteroLRResult:
    """The same model, batches and steps as `train_encrypted`, without encryption: the baseline."""
    X_guest, X_hosts, y = check_inputs(X_guest, X_hosts, y)
    X_g = with_intercept(X_guest)
    y_signed = signed_labels(y)
    w_g = np.zeros(X_g.shape[1])
    w_hs = [np.zeros(X.shape[1]) for X in X_hosts]
    pen_g = _penalised(len(w_g), intercept=True)
    pen_hs = [_penalised(len(w), intercept=False) for w in w_hs]
    rng = np.random.default_rng(config.seed)
    losses: list[float | None] = []
    epoch_seconds = []
    for _ in range(config.epochs):
        started = time.perf_counter()
        batch_losses = []
        for rows in epoch_batches(len(y), config.batch_size, rng):
            z_hs = [host_part(X[rows], w) for X, w in zip(X_hosts, w_hs, strict=True)]
            d = guest_part(X_g[rows], w_g, y_signed[rows]) + sum(z_hs)
            if config.compute_loss and len(X_hosts) == 1:
                u = X_g[rows] @ w_g + 4.0 * z_hs[0]
                batch_losses.append(
                    taylor_loss(u, y_signed[rows])
                    + l2_term(w_g, config.l2, pen_g)
                    + l2_term(w_hs[0], config.l2, pen_hs[0])
                )
            g_g = taylor_gradient(X_g[rows], d, w_g, config.l2, pen_g)
            g_hs = [
                taylor_gradient(X[rows], d, w, config.l2, pen)
                for X, w, pen in zip(X_hosts, w_hs, pen_hs, strict=True)
            ]
            w_g = w_g - config.learning_rate * g_g
            w_hs = [w - config.learning_rate * g for w, g in zip(w_hs, g_hs, strict=True)]
        losses.append(float(np.mean(batch_losses)) if batch_losses else None)
        epoch_seconds.append(time.perf_counter() - started)
    return HeteroLRResult(w_g, w_hs, losses, epoch_seconds)


# ---------------------------------------------------------------------------------------------
# Fixed point and ciphertext arithmetic (phe's EncryptedNumber operations, exponent 0 throughout)
# ---------------------------------------------------------------------------------------------


def to_fixed(values: np.ndarray, bits: int) -> np.ndarray:
    """round(values·2^bits) as int64; a value too large for that (a diverged model) raises."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * float(1 << bits))
    if not np.all(np.abs(scaled) < 2.0**_INT64_BITS):
        raise FedShopError(
            f"a value does not fit {bits}-bit fixed point (|x| ≥ 2^{_INT64_BITS - bits}): the "
            f"model diverged; lower the learning rate"
        )
    return scaled.astype(np.int64)


def fixed_scalar(value: float, bits: int) -> int:
    """round(value·2^bits) as a Python integer (exact: scaling by 2^bits is exact in float64)."""
    if not math.isfinite(value):
        raise FedShopError("a non-finite value cannot be encrypted: the model diverged")
    return round(value * 2.0**bits)


def signed_residue(value: int, n: int) -> int:
    """A residue mod n as the signed integer it encodes (|value| < n/2)."""
    return value - n if value > n // 2 else value


def _plain(public_key: PaillierPublicKey, value: int) -> EncodedNumber:
    # A signed integer as phe's exponent-0 encoding (negative values wrap mod n, as phe's own).
    return EncodedNumber(public_key, int(value) % public_key.n, 0)


def encrypt_vector(public_key: PaillierPublicKey, values: np.ndarray) -> list[EncryptedNumber]:
    """Fresh encryptions (random r^n each): the slow step, one modular exponentiation per value."""
    return [public_key.encrypt(int(v)) for v in values]


def transpose_product(x_fixed: np.ndarray, d: Sequence[EncryptedNumber]) -> list[EncryptedNumber]:
    """[[X^T·d]]: Σ_i x_ij·[[d_i]] per column j. Zero entries are skipped (one-hot columns are
    mostly zero); a column of zeros gives a trivial encryption of 0, masked before it leaves."""
    public_key = d[0].public_key
    out = []
    for j in range(x_fixed.shape[1]):
        column = x_fixed[:, j]
        total = None
        for i in np.flatnonzero(column):
            term = d[i] * _plain(public_key, int(column[i]))
            total = term if total is None else total + term
        out.append(total if total is not None else EncryptedNumber(public_key, 1, 0))
    return out


def mask(encrypted: Sequence[EncryptedNumber]) -> tuple[list[int], list[int]]:
    """(raw ciphertexts of g + R, the masks R), R uniform in Z_n: (g + R) mod n is uniform whatever
    g is. Each mask is freshly encrypted, so the sum is freshly randomised too."""
    public_key = encrypted[0].public_key
    masks = [secrets.randbelow(public_key.n) for _ in encrypted]
    masked = [
        (value + EncryptedNumber(public_key, public_key.raw_encrypt(r), 0)).ciphertext(
            be_secure=False
        )
        for value, r in zip(encrypted, masks, strict=True)
    ]
    return masked, masks


def unmask(residues: Sequence[int], masks: Sequence[int], n: int) -> list[int]:
    return [signed_residue((v - r) % n, n) for v, r in zip(residues, masks, strict=True)]


def _residues_to_bytes(values: Sequence[int], n: int) -> bytes:
    width = (n.bit_length() + 7) // 8
    return b"".join(v.to_bytes(width, "big") for v in values)


def _residues_from_bytes(message: bytes, n: int, count: int) -> list[int]:
    width = (n.bit_length() + 7) // 8
    if len(message) != count * width:
        raise FedShopError(f"the arbiter sent {len(message)} bytes; expected {count} × {width}")
    return [int.from_bytes(message[i : i + width], "big") for i in range(0, len(message), width)]


def _public_key(message: dict) -> PaillierPublicKey:
    return PaillierPublicKey(int.from_bytes(message["n"], "big"))


def _gradient_from(
    residues: Sequence[int], masks: Sequence[int], n: int, scale_bits: int, rows: int
) -> np.ndarray:
    return np.array(unmask(residues, masks, n), dtype=np.float64) / float(1 << scale_bits) / rows


# ---------------------------------------------------------------------------------------------
# The parties (messages are dicts; ciphertexts travel as `pack_ciphertexts` bytes)
# ---------------------------------------------------------------------------------------------


class Arbiter:
    """Holds the private key; decrypts masked gradients and, with one host, the loss."""

    def __init__(self, config: HeteroLRConfig) -> None:
        self.config = config
        self._holder = PaillierKeyHolder(config.key_bits)
        self.public_key = PaillierPublicKey(int.from_bytes(self._holder.public_key(), "big"))

    def key_message(self) -> dict:
        return {"kind": "public_key", "n": self._holder.public_key()}

    def decrypt_gradient(self, message: dict) -> dict:
        residues = self._holder.decrypt_residues(
            message["gradient"], message["count"], message["party"]
        )
        return {
            "kind": "masked_gradient_decrypted",
            "batch": message["batch"],
            "values": _residues_to_bytes(residues, self.public_key.n),
            "count": message["count"],
        }

    def decrypt_loss(self, message: dict) -> float:
        (residue,) = self._holder.decrypt_residues(message["loss"], 1, "the guest")
        scaled = signed_residue(residue, self.public_key.n)
        return scaled / float(1 << (2 * self.config.residual_bits)) / message["rows"]


class Host:
    """Holds X_h and w_h; sees only ciphertexts, batch indices and its own gradient."""

    def __init__(self, name: str, X: np.ndarray, key: dict, config: HeteroLRConfig) -> None:
        self.name, self.config = name, config
        self.X = np.asarray(X, dtype=np.float64)
        self.w = np.zeros(self.X.shape[1])
        self._penalised = _penalised(len(self.w), intercept=False)
        self._public = _public_key(key)
        self._x_fixed = to_fixed(self.X, config.feature_bits)
        self._rows: np.ndarray | None = None
        self._masks: list[int] = []

    def forward(self, batch: dict) -> dict:
        """Step 2: [[X_h·w_h / 4]] for the batch's rows (and the loss terms, when asked)."""
        self._rows = batch["rows"]
        rb = self.config.residual_bits
        z = host_part(self.X[self._rows], self.w)
        message = {
            "kind": "host_part",
            "batch": batch["batch"],
            "party": self.name,
            "z": pack_ciphertexts(
                [c.ciphertext() for c in encrypt_vector(self._public, to_fixed(z, rb))],
                self._public,
            ),
        }
        if batch["with_loss"]:
            terms = 2.0 * float(z @ z) + len(self._rows) * l2_term(
                self.w, self.config.l2, self._penalised
            )
            value = fixed_scalar(terms, 2 * rb)
            message["loss_terms"] = pack_ciphertexts(
                [self._public.encrypt(value).ciphertext()], self._public
            )
        return message

    def gradient(self, residual: dict) -> dict:
        """Step 4: [[X_h^T·d + R]] for the arbiter."""
        assert self._rows is not None, "forward first"
        cipher = unpack_ciphertexts(residual["d"], self._public, len(self._rows), "the guest")
        d = [EncryptedNumber(self._public, c, 0) for c in cipher]
        masked, self._masks = mask(transpose_product(self._x_fixed[self._rows], d))
        return {
            "kind": "masked_gradient",
            "batch": residual["batch"],
            "party": self.name,
            "count": len(masked),
            "gradient": pack_ciphertexts(masked, self._public),
        }

    def update(self, decrypted: dict) -> None:
        """Step 5: remove the masks, add the L2 term, take the step."""
        self.w = _step(self, decrypted)
        self._rows, self._masks = None, []


def _step(party, decrypted: dict) -> np.ndarray:
    """A party's (guest's or host's) weights after step 5: its gradient unmasked from the arbiter's
    decrypted residues, plus the L2 term, one SGD step."""
    assert party._rows is not None, "a step before its batch"
    n = party._public.n
    residues = _residues_from_bytes(decrypted["values"], n, len(party.w))
    scale = party.config.feature_bits + party.config.residual_bits
    g = _gradient_from(residues, party._masks, n, scale, len(party._rows))
    g = g + party.config.l2 * party._penalised * party.w
    return party.w - party.config.learning_rate * g


class Guest:
    """Holds X_g, y and w_g (with the intercept); draws the batches; forms [[d]]."""

    def __init__(
        self, X: np.ndarray, y: np.ndarray, key: dict, n_hosts: int, config: HeteroLRConfig
    ) -> None:
        self.config, self.n_hosts = config, n_hosts
        self.X = with_intercept(np.asarray(X, dtype=np.float64))
        self.y = signed_labels(np.asarray(y, dtype=np.float64))
        self.w = np.zeros(self.X.shape[1])
        self._penalised = _penalised(len(self.w), intercept=True)
        self._public = _public_key(key)
        self._x_fixed = to_fixed(self.X, config.feature_bits)
        self._rng = np.random.default_rng(config.seed)
        self._rows: np.ndarray | None = None
        self._d: list[EncryptedNumber] = []
        self._host_parts: Sequence[dict] = ()
        self._masks: list[int] = []
        self.with_loss = config.compute_loss and n_hosts == 1

    def batches(self, epoch: int) -> list[dict]:
        """Step 1: the epoch's batches, as the messages that announce them to the hosts."""
        return [
            {"kind": "batch", "batch": (epoch, k), "rows": rows, "with_loss": self.with_loss}
            for k, rows in enumerate(epoch_batches(len(self.y), self.config.batch_size, self._rng))
        ]

    def residual(self, batch: dict, host_parts: Sequence[dict]) -> dict:
        """Step 3: [[d]] = Σ [[z_h]] + (X_g·w_g/4 - y/2), re-randomised, for the hosts."""
        rows = self._rows = batch["rows"]
        self._host_parts = host_parts
        total = None
        for part in host_parts:
            cipher = unpack_ciphertexts(part["z"], self._public, len(rows), part["party"])
            z = [EncryptedNumber(self._public, c, 0) for c in cipher]
            total = z if total is None else [a + b for a, b in zip(total, z, strict=True)]
        own = to_fixed(guest_part(self.X[rows], self.w, self.y[rows]), self.config.residual_bits)
        self._d = [c + _plain(self._public, int(v)) for c, v in zip(total, own, strict=True)]
        # ciphertext(be_secure=True) multiplies by a fresh r^n: without it a host could divide its
        # own [[z_h]] out of [[d]] and read the guest's part, labels included.
        return {
            "kind": "residual",
            "batch": batch["batch"],
            "d": pack_ciphertexts([c.ciphertext(be_secure=True) for c in self._d], self._public),
        }

    def loss(self) -> dict:
        """Step 4 (one host): [[B·loss]], from its own plaintext terms and the host's ciphertexts:
        B·log 2 - Σ y·u_g/2 + Σ u_g²/8 + Σ (u_g - 2y)·[[z]] + [[2·Σ z² + B·λ/2·|w_h|²]]."""
        assert self._rows is not None and len(self._host_parts) == 1
        rows, rb = self._rows, self.config.residual_bits
        (part,) = self._host_parts
        u_g = self.X[rows] @ self.w
        y = self.y[rows]
        plain = (
            len(rows) * (_LOG2 + l2_term(self.w, self.config.l2, self._penalised))
            - 0.5 * float(y @ u_g)
            + 0.125 * float(u_g @ u_g)
        )
        z = [
            EncryptedNumber(self._public, c, 0)
            for c in unpack_ciphertexts(part["z"], self._public, len(rows), part["party"])
        ]
        (terms,) = unpack_ciphertexts(part["loss_terms"], self._public, 1, part["party"])
        total = EncryptedNumber(self._public, terms, 0) + _plain(
            self._public, fixed_scalar(plain, 2 * rb)
        )
        for c, a in zip(z, to_fixed(u_g - 2.0 * y, rb), strict=True):
            if a:
                total = total + c * _plain(self._public, int(a))
        return {
            "kind": "loss",
            "batch": None,
            "rows": len(rows),
            "loss": pack_ciphertexts([total.ciphertext(be_secure=True)], self._public),
        }

    def gradient(self, batch: dict) -> dict:
        """Step 4: [[X_g^T·d + R]] for the arbiter."""
        assert self._rows is not None
        masked, self._masks = mask(transpose_product(self._x_fixed[self._rows], self._d))
        return {
            "kind": "masked_gradient",
            "batch": batch["batch"],
            "party": "the guest",
            "count": len(masked),
            "gradient": pack_ciphertexts(masked, self._public),
        }

    def update(self, decrypted: dict) -> None:
        self.w = _step(self, decrypted)
        self._rows, self._d, self._masks = None, [], []


# ---------------------------------------------------------------------------------------------
# RentTheRunway as hetero-LR inputs (the tests' and the benchmarks')

HOST_COLUMNS = ("height_in", "weight_lbs", "age", "bust_size_num")


def renttherunway_rows(data_dir) -> pd.DataFrame:
    """Clean RentTheRunway rows with every feature the split below uses, shuffled once (seeded)."""
    from pathlib import Path

    frame = pd.read_parquet(Path(data_dir) / "renttherunway" / "renttherunway_clean.parquet")
    frame = frame.dropna(subset=["size", "category", "fit", *HOST_COLUMNS])
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)


def renttherunway_columns(frame: pd.DataFrame, categories: int = 8):
    """Guest: standardised size and the top `categories` categories one-hot; host: standardised
    body measures; label: the item ran small. (X_guest, X_host, y)."""

    def standard(values: pd.Series) -> np.ndarray:
        values = values.to_numpy(dtype=np.float64)
        return (values - values.mean()) / values.std()

    top = frame["category"].value_counts().index[:categories]
    X_guest = np.column_stack(
        [standard(frame["size"])] + [(frame["category"] == c).to_numpy(float) for c in top]
    )
    X_host = np.column_stack([standard(frame[c]) for c in HOST_COLUMNS])
    return X_guest, X_host, (frame["fit"] == "small").to_numpy(np.float64)


# ---------------------------------------------------------------------------------------------
# The in-process driver
# ---------------------------------------------------------------------------------------------


def message_bytes(message: dict) -> int:
    """What a message carries: its ciphertext and residue bytes and its row indices (int32 each)."""
    total = 0
    for value in message.values():
        if isinstance(value, bytes):
            total += len(value)
        elif isinstance(value, np.ndarray):
            total += 4 * value.size
    return total


Transcript = list[tuple[str, str, dict]]  # (sender, receiver, message)


def train_encrypted(
    X_guest: np.ndarray,
    X_hosts: Sequence[np.ndarray],
    y: np.ndarray,
    config: HeteroLRConfig,
    *,
    transcript: Transcript | None = None,
) -> HeteroLRResult:
    """Runs the protocol with every party in this process, one after another (no network, one
    core): each epoch's seconds are the sum of all parties' work. Every message goes through
    `send`, which counts its bytes by route and, given `transcript`, records it."""
    X_guest, X_hosts, y = check_inputs(X_guest, X_hosts, y)
    seconds = {"guest": 0.0, "hosts": 0.0, "arbiter": 0.0}
    routes: dict[str, int] = {}

    def timed(party: str, call: Callable, *args):
        started = time.perf_counter()
        result = call(*args)
        seconds[party] += time.perf_counter() - started
        return result

    def send(sender: str, receiver: str, message: dict) -> dict:
        route = f"{sender.rstrip('0123456789')}→{receiver.rstrip('0123456789')}"
        routes[route] = routes.get(route, 0) + message_bytes(message)
        if transcript is not None:
            transcript.append((sender, receiver, message))
        return message

    started = time.perf_counter()
    arbiter = Arbiter(config)
    key_setup_seconds = time.perf_counter() - started
    key = arbiter.key_message()
    guest = Guest(X_guest, y, send("arbiter", "guest", key), len(X_hosts), config)
    hosts = [
        Host(f"host{i}", X, send("arbiter", f"host{i}", key), config) for i, X in enumerate(X_hosts)
    ]
    routes.clear()  # the key is sent once per run, not per epoch

    losses: list[float | None] = []
    epoch_seconds = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        batch_losses = []
        for batch in timed("guest", guest.batches, epoch):
            parts = []
            for host in hosts:
                send("guest", host.name, batch)
                parts.append(send(host.name, "guest", timed("hosts", host.forward, batch)))
            residual = timed("guest", guest.residual, batch, parts)
            to_arbiter = [send("guest", "arbiter", timed("guest", guest.gradient, batch))]
            for host in hosts:
                send("guest", host.name, residual)
                to_arbiter.append(
                    send(host.name, "arbiter", timed("hosts", host.gradient, residual))
                )
            if guest.with_loss:
                loss = send("guest", "arbiter", timed("guest", guest.loss))
                batch_losses.append(timed("arbiter", arbiter.decrypt_loss, loss))
            replies = [timed("arbiter", arbiter.decrypt_gradient, m) for m in to_arbiter]
            timed("guest", guest.update, send("arbiter", "guest", replies[0]))
            for host, reply in zip(hosts, replies[1:], strict=True):
                timed("hosts", host.update, send("arbiter", host.name, reply))
        losses.append(float(np.mean(batch_losses)) if batch_losses else None)
        epoch_seconds.append(time.perf_counter() - started)
    return HeteroLRResult(
        w_guest=guest.w,
        w_hosts=[host.w for host in hosts],
        losses=losses,
        epoch_seconds=epoch_seconds,
        bytes_per_epoch={route: total / config.epochs for route, total in sorted(routes.items())},
        party_seconds=seconds,
        key_setup_seconds=key_setup_seconds,
    )


def train_one_vs_rest(
    X_guest: np.ndarray,
    X_hosts: Sequence[np.ndarray],
    labels: np.ndarray,
    config: HeteroLRConfig,
    *,
    encrypted: bool = True,
) -> dict[object, HeteroLRResult]:
    """One binary model per class (class vs the rest), as FATE trains multi-class LR: the guest
    announces only the number of classes; each model is a full run of the binary protocol."""
    labels = np.asarray(labels)
    train = train_encrypted if encrypted else train_plaintext
    return {
        label: train(X_guest, X_hosts, (labels == label).astype(np.float64), config)
        for label in np.unique(labels).tolist()
    }


def predict_one_vs_rest(
    models: dict[object, HeteroLRResult], X_guest: np.ndarray, X_hosts: Sequence[np.ndarray]
) -> np.ndarray:
    """The class whose one-vs-rest score is highest, per row."""
    classes = list(models)
    scores = np.column_stack([models[c].scores(X_guest, X_hosts) for c in classes])
    return np.asarray(classes, dtype=object)[np.argmax(scores, axis=1)]


def time_per_epoch(
    X_guest: np.ndarray,
    X_hosts: Sequence[np.ndarray],
    y: np.ndarray,
    config: HeteroLRConfig,
    *,
    test: tuple[np.ndarray, Sequence[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """The encrypted protocol against the same model in plaintext on the same rows and batches:
    seconds per epoch (mean over `config.epochs`), their ratio, ciphertext bytes per epoch by
    route, AUC of both (on `test` when given, else on the training rows: `auc_on` says which) and
    the largest weight difference between the two runs."""
    encrypted = train_encrypted(X_guest, X_hosts, y, config)
    plaintext = train_plaintext(X_guest, X_hosts, y, config)
    eval_guest, eval_hosts, eval_y = test if test is not None else (X_guest, X_hosts, y)
    enc_seconds = float(np.mean(encrypted.epoch_seconds))
    plain_seconds = float(np.mean(plaintext.epoch_seconds))
    difference = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(
            [encrypted.w_guest, *encrypted.w_hosts],
            [plaintext.w_guest, *plaintext.w_hosts],
            strict=True,
        )
    )
    return {
        "rows": len(y),
        "guest_features": int(np.shape(X_guest)[1]),
        "host_features": [int(np.shape(X)[1]) for X in X_hosts],
        "key_bits": config.key_bits,
        "batch_size": config.batch_size,
        "epochs": config.epochs,
        "encrypted_seconds_per_epoch": enc_seconds,
        "plaintext_seconds_per_epoch": plain_seconds,
        "he_overhead_ratio": enc_seconds / plain_seconds,
        "party_seconds_per_epoch": {
            party: s / config.epochs for party, s in encrypted.party_seconds.items()
        },
        "key_setup_seconds": encrypted.key_setup_seconds,
        "bytes_per_epoch": encrypted.bytes_per_epoch,
        "plaintext_bytes_per_epoch": _plaintext_bytes(len(y), len(X_hosts), config),
        "auc_encrypted": auc(encrypted.scores(eval_guest, eval_hosts), eval_y),
        "auc_plaintext": auc(plaintext.scores(eval_guest, eval_hosts), eval_y),
        "auc_on": "test rows" if test is not None else "training rows",
        "max_weight_difference": difference,
        "loss_encrypted": encrypted.losses,
        "loss_plaintext": plaintext.losses,
    }


def _plaintext_bytes(rows: int, n_hosts: int, config: HeteroLRConfig) -> dict[str, float]:
    """What the unencrypted protocol would send per epoch in float64 (z to the guest, d back to
    each host); its gradients never leave their owner, so there is no arbiter."""
    return {"host→guest": 8.0 * rows * n_hosts, "guest→host": 8.0 * rows * n_hosts}
