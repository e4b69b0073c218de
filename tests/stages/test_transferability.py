"""LogME against values worked out by hand and against a second, independent form of the evidence; the
Frechet distance on a hand-computed case; the advisor's 2x2 placement on synthetic feature sets."""
from __future__ import annotations

import math

import numpy as np
import pytest

from stages.transferability import (RECOMMENDATIONS, SIMILAR_MAX_RATIO, SMALL_MAX_PER_CLASS, domain_ratio,
                                    evidence, fit_evidence, frechet_distance, logme, place)


def gaussian_evidence(F: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """The same evidence in its other form: y ~ N(0, F F'/alpha + I/beta) (w integrated out by hand)."""
    C = F @ F.T / alpha + np.eye(len(y)) / beta
    return float(-0.5 * (len(y) * math.log(2 * math.pi) + np.linalg.slogdet(C)[1] + y @ np.linalg.solve(C, y)))


def test_evidence_matches_a_value_worked_out_by_hand():
    # F = [[1], [2]], y = [1, 0], alpha = beta = 1: C = F F' + I = [[2, 2], [2, 5]], det 6,
    # C^-1 = [[5, -2], [-2, 2]] / 6, y'C^-1 y = 5/6  =>  log p = -log(2 pi) - log(6)/2 - 5/12
    F, y = np.array([[1.0], [2.0]]), np.array([1.0, 0.0])
    assert evidence(F, y, 1.0, 1.0) == pytest.approx(-math.log(2 * math.pi) - math.log(6) / 2 - 5 / 12, abs=1e-12)
    # alpha = 2, beta = 0.5: C = F F'/2 + 2 I = [[2.5, 1], [1, 4]], det 9, y'C^-1 y = 4/9
    assert evidence(F, y, 2.0, 0.5) == pytest.approx(-math.log(2 * math.pi) - math.log(9) / 2 - 2 / 9, abs=1e-12)


def test_evidence_equals_the_marginal_gaussian_form_and_the_fixed_point_maximises_it():
    rng = np.random.default_rng(0)
    for n, D in ((9, 3), (5, 8)):  # more samples than features, and fewer
        F, y = rng.normal(size=(n, D)), (rng.random(n) < 0.5).astype(float)
        for a, b in ((0.3, 4.0), (2.0, 0.7)):
            assert evidence(F, y, a, b) == pytest.approx(gaussian_evidence(F, y, a, b), rel=1e-9)
        best, a, b = fit_evidence(F, y)
        assert best == pytest.approx(gaussian_evidence(F, y, a, b), rel=1e-9)
        around = [gaussian_evidence(F, y, a * fa, b * fb) for fa in (0.8, 1, 1.25) for fb in (0.8, 1, 1.25)]
        assert best >= max(around) - 1e-6, (best, around)  # the fixed point is the maximum nearby


def test_logme_is_the_mean_per_class_evidence_over_n_and_ranks_informative_features_first():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 90)
    good = np.eye(3)[y] + 0.2 * rng.normal(size=(90, 3))
    noise = rng.normal(size=(90, 3))
    expected = np.mean([fit_evidence(good, (y == c).astype(float))[0] for c in range(3)]) / 90
    assert logme(good, y) == pytest.approx(expected, rel=1e-9)
    assert logme(good, y) > logme(noise, y) + 0.5


def test_frechet_distance_on_a_hand_computed_case():
    # 1-D: a = [-1, 1] (mean 0, var 2), b = [2, 6] (mean 4, var 8): 16 + (sqrt 2 - sqrt 8)^2 = 18
    assert frechet_distance(np.array([[-1.0], [1.0]]), np.array([[2.0], [6.0]])) == pytest.approx(18.0)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 4))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert domain_ratio(rng.normal(size=(400, 8)), rng.normal(size=(100, 8)))["ratio"] < SIMILAR_MAX_RATIO


CENTRES = np.random.default_rng(5).normal(size=(24, 16))  # the source domain: a mixture of 24 clusters


def synthetic(rng, classes: int, per_class: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Draws from the source mixture, labelled anew (cluster index mod ``classes``), moved by ``shift``."""
    y = np.repeat(np.arange(classes), per_class)
    cluster = y + classes * rng.integers(0, len(CENTRES) // classes, size=len(y))  # a cluster of label y
    return CENTRES[cluster] + 0.5 * rng.normal(size=(len(y), CENTRES.shape[1])) + shift, y


@pytest.mark.parametrize("per_class,shift,quadrant,strategy", [
    (10, 0.0, "similar & small", "linear_probe"),
    (300, 0.0, "similar & large", "finetune"),
    (300, 2.0, "different & large", "finetune"),
    (10, 2.0, "different & small", "lp_ft"),
])
def test_the_advisor_places_synthetic_feature_sets_in_the_right_quadrant(per_class, shift, quadrant, strategy):
    rng = np.random.default_rng(3)
    source, _ = synthetic(rng, 12, 40, 0.0)  # held-out source features: 480 rows
    target, y = synthetic(rng, 8, per_class, shift)
    advice = place(source, target, y).to_json()
    assert advice["quadrant"] == quadrant, advice
    assert advice["recommendation"]["strategy"] == strategy
    assert ("warning" in advice["recommendation"]) == (quadrant == "different & small")
    assert advice["per_class"]["median"] == per_class and advice["classes"] == 8
    assert (advice["domain_distance"]["ratio"] < SIMILAR_MAX_RATIO) == (shift == 0.0)


def test_the_size_threshold_is_on_the_median_per_class_count():
    rng = np.random.default_rng(4)
    source, _ = synthetic(rng, 12, 40, 0.0)
    target, _ = synthetic(rng, 4, 60, 0.0)
    # 3 classes just under the threshold and one big one: the median decides, not the total
    y = np.repeat(np.arange(4), [SMALL_MAX_PER_CLASS - 1] * 3 + [240 - 3 * (SMALL_MAX_PER_CLASS - 1)])
    assert place(source, target, y).size == "small"
    assert place(source, target, np.repeat(np.arange(4), 60)).size == "large"
    assert set(RECOMMENDATIONS) == {(d, s) for d in ("similar", "different") for s in ("small", "large")}
