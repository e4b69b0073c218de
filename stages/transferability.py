"""Transferability without training: LogME, a domain distance between frozen-feature statistics, and the
2x2 of target size x domain similarity that ``baton advise`` places a target in.

numpy only (float64), so ``python -m stages`` machines and the advisor share it without scipy.

LogME (Kaichao You, Yong Liu, Jianmin Wang, Mingsheng Long, "LogME: Practical Assessment of Pre-trained
Models for Transfer Learning", ICML 2021), from the paper: for features F (n, D) and one class's one-hot
column y (n,), the Bayesian linear model y = F w + e with prior w ~ N(0, 1/alpha I) and noise
e ~ N(0, 1/beta I) has the evidence

    log p(y | F, alpha, beta) = n/2 log beta + D/2 log alpha - n/2 log 2pi - beta/2 ||F m - y||^2
                                - alpha/2 m'm - 1/2 log |A|,      A = alpha I + beta F'F,  m = beta A^-1 F'y

maximised over (alpha, beta) by the paper's fixed point (Algorithm 1): with sigma_i the eigenvalues of F'F,
gamma = sum_i beta sigma_i / (alpha + beta sigma_i), alpha <- gamma / m'm, beta <- (n - gamma) / ||F m - y||^2.
LogME = mean over classes of the maximised evidence / n (higher = features fit the labels better).

Domain distance: the Frechet distance between Gaussians fitted to two feature sets,
||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), which grows with the sample-size bias of the
covariances. So :func:`domain_ratio` compares like with like: FD(target, held-out source) over
FD(held-out source, other held-out source) at the same sample size m, averaged over random draws: about 1
for a target from the source's own distribution, larger the further away it is."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# The thresholds of the 2x2 (README "The 2x2 advisor" says how they were set)
SMALL_MAX_PER_CLASS = 50  # median images per class below this: "small"
SIMILAR_MAX_RATIO = 2.0  # domain_ratio below this: "similar"
RATIO_REPEATS = 5  # random draws averaged by domain_ratio

RECOMMENDATIONS: dict[tuple[str, str], dict] = {
    ("similar", "small"): {"strategy": "linear_probe", "overrides": {"transfer.strategy": "linear_probe"},
                           "why": "few labels on features that already separate this domain: train only the head"},
    ("similar", "large"): {"strategy": "finetune", "overrides": {"transfer.strategy": "finetune"},
                           "why": "enough labels to adapt every layer without overfitting; starts near a good "
                                  "solution"},
    ("different", "large"): {"strategy": "finetune", "overrides": {"transfer.strategy": "finetune"},
                             "why": "enough labels to relearn the features the new domain needs; the pretrained "
                                    "init is rarely worse than scratch (scratch is the alternative)"},
    ("different", "small"): {"strategy": "lp_ft", "overrides": {"transfer.strategy": "lp_ft",
                                                                 "transfer.lp_steps": "<~1/3 of steps>",
                                                                 "transfer.ft_lr_mult": 0.1},
                             "alternative": {"transfer.strategy": "partial", "transfer.freeze_blocks": 2,
                                             "transfer.backbone_lr_mult": 0.1},
                             "why": "few labels in a domain the features were not made for",
                             "warning": "risky corner: different domain and few labels; neither frozen features "
                                        "nor full fine-tuning is safe. Try LP-FT (a linear probe first, then "
                                        "everything at a low LR) or partial fine-tuning at a low backbone LR, and "
                                        "check against a linear probe and scratch on held-out data"},
}


def _evidence_terms(F: np.ndarray, y: np.ndarray, alpha: float, beta: float, s: np.ndarray, V: np.ndarray,
                    Fty: np.ndarray) -> tuple[float, np.ndarray, float]:
    """(log evidence, m, ||F m - y||^2) at (alpha, beta); s, V = eigh(F'F)."""
    n, D = F.shape
    m = V @ (beta * (V.T @ Fty) / (alpha + beta * s))  # (D,)
    res2 = float(np.sum((F @ m - y) ** 2))
    logdet = float(np.sum(np.log(alpha + beta * s)))
    ev = (n / 2 * math.log(beta) + D / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
          - beta / 2 * res2 - alpha / 2 * float(m @ m) - logdet / 2)
    return ev, m, res2


def evidence(F: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of the paper's Bayesian linear model (see the module docstring)."""
    F, y = np.asarray(F, np.float64), np.asarray(y, np.float64)
    s, V = np.linalg.eigh(F.T @ F)
    return _evidence_terms(F, y, alpha, beta, np.clip(s, 0, None), V, F.T @ y)[0]


def fit_evidence(F: np.ndarray, y: np.ndarray, tol: float = 1e-5, max_iter: int = 100,
                 eig: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, float, float]:
    """The paper's fixed point for one target column: (max log evidence, alpha, beta)."""
    F, y = np.asarray(F, np.float64), np.asarray(y, np.float64)
    n = F.shape[0]
    s, V = eig if eig is not None else np.linalg.eigh(F.T @ F)
    s = np.clip(s, 0, None)
    Fty = F.T @ y
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        _, m, res2 = _evidence_terms(F, y, alpha, beta, s, V, Fty)
        gamma = float(np.sum(beta * s / (alpha + beta * s)))
        new_alpha = gamma / max(float(m @ m), 1e-12)
        new_beta = (n - gamma) / max(res2, 1e-12)
        done = abs(new_alpha - alpha) / alpha < tol and abs(new_beta - beta) / beta < tol
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return _evidence_terms(F, y, alpha, beta, s, V, Fty)[0], alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of ``features`` (n, D) for integer class ``labels`` (n,): mean over classes of the maximised
    log evidence of the one-hot column, divided by n. Higher = better transferability.

    >>> rng = np.random.default_rng(0); y = rng.integers(0, 3, 60)
    >>> logme(np.eye(3)[y] + 0.1 * rng.normal(size=(60, 3)), y) > logme(rng.normal(size=(60, 3)), y)
    True"""
    F = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    eig = np.linalg.eigh(F.T @ F)
    classes = np.unique(labels)
    return float(np.mean([fit_evidence(F, (labels == c).astype(np.float64), eig=eig)[0] for c in classes])
                 / len(F))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` (n1, D) and ``b`` (n2, D)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, U = np.linalg.eigh(s1)
    root1 = (U * np.sqrt(np.clip(w, 0, None))) @ U.T  # S1^1/2
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()  # tr (S1^1/2 S2 S1^1/2)^1/2
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def domain_ratio(source: np.ndarray, target: np.ndarray, repeats: int = RATIO_REPEATS, seed: int = 0) -> dict[str, float]:
    """How far ``target`` features sit from held-out ``source`` features, in units of the source's own
    sampling noise: mean FD(target_m, source_b) / mean FD(source_a, source_b) over ``repeats`` random draws,
    where source_a, source_b are disjoint draws of m = min(len(target), len(source) // 2) source rows and
    target_m is m target rows. Returns {"ratio", "distance", "baseline", "m"}."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    m = min(len(target), len(source) // 2)
    if m < 2:
        raise ValueError(f"domain_ratio needs >= 2 target rows and >= 4 source rows (got {len(target)}, {len(source)})")
    rng = np.random.default_rng(seed)
    d, base = [], []
    for _ in range(repeats):
        perm = rng.permutation(len(source))
        a, b = source[perm[:m]], source[perm[m:2 * m]]
        t = target[rng.permutation(len(target))[:m]]
        d.append(frechet_distance(t, b))
        base.append(frechet_distance(a, b))
    distance, baseline = float(np.mean(d)), float(np.mean(base))
    return {"ratio": distance / max(baseline, 1e-12), "distance": distance, "baseline": baseline, "m": m}


@dataclass
class Advice:
    """Where a target sits in the 2x2 and what to do about it (``to_json`` is ``baton advise --json``)."""

    size: str  # small | large
    domain: str  # similar | different
    per_class: dict[str, float]  # min / median / max images per class
    classes: int
    images: int
    domain_distance: dict[str, float]
    logme: float
    thresholds: dict[str, float] = field(default_factory=lambda: {"small_max_per_class": SMALL_MAX_PER_CLASS,
                                                                  "similar_max_ratio": SIMILAR_MAX_RATIO})

    @property
    def recommendation(self) -> dict:
        return RECOMMENDATIONS[(self.domain, self.size)]

    def to_json(self) -> dict:
        return {"quadrant": f"{self.domain} & {self.size}", "size": self.size, "domain": self.domain,
                "recommendation": self.recommendation, "images": self.images, "classes": self.classes,
                "per_class": self.per_class, "domain_distance": self.domain_distance, "logme": self.logme,
                "thresholds": self.thresholds}


def place(source: np.ndarray, target: np.ndarray, target_labels: np.ndarray, counts: np.ndarray | None = None,
          seed: int = 0) -> Advice:
    """Frozen features of held-out source data (n_s, D) and of the target (n_t, D) with its labels -> Advice.
    ``counts``: images per class of the whole target when the features are of a subset (default: the labels')."""
    counts = np.bincount(np.asarray(target_labels)) if counts is None else np.asarray(counts)
    counts = counts[counts > 0]
    per_class = {"min": float(counts.min()), "median": float(np.median(counts)), "max": float(counts.max())}
    dom = domain_ratio(source, target, seed=seed)
    return Advice(size="small" if per_class["median"] < SMALL_MAX_PER_CLASS else "large",
                  domain="similar" if dom["ratio"] < SIMILAR_MAX_RATIO else "different", per_class=per_class,
                  classes=len(counts), images=int(counts.sum()), domain_distance=dom,
                  logme=logme(target, target_labels))
