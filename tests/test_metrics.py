"""GLUE metrics against values worked out by hand, and their edge cases against the libraries the GLUE reference
metric wraps (scikit-learn's matthews_corrcoef and f1_score, scipy's pearsonr and spearmanr)."""

import math
import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from kasa.evaluation.metrics import METRIC_NAMES, compute_metrics, improves, main_metric


def test_binary_from_class_ids() -> None:
    predictions = np.array([1, 1, 0, 0, 1])
    labels = np.array([1, 0, 0, 1, 1])
    # TP = 2 (rows 0, 4), FP = 1 (row 1), TN = 1 (row 2), FN = 1 (row 3)
    # accuracy = (TP + TN) / N = 3 / 5
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    # F1 = 2TP / (2TP + FP + FN) = 4 / 6
    metrics = compute_metrics(predictions, labels, num_labels=2)
    assert metrics == pytest.approx({"accuracy": 0.6, "matthews": 1 / 6, "f1": 2 / 3})


def test_binary_from_logits_matches_class_ids() -> None:
    logits = np.array([[0.1, 2.0], [-1.0, 0.5], [3.0, -3.0], [0.2, 0.1], [0.0, 0.3]])  # argmax: 1, 1, 0, 0, 1
    labels = np.array([1, 0, 0, 1, 1])
    assert compute_metrics(logits, labels, 2) == compute_metrics(np.array([1, 1, 0, 0, 1]), labels, 2)


def test_perfect_and_inverted_predictions() -> None:
    labels = np.array([0, 1, 1, 0])
    assert compute_metrics(labels, labels, 2) == pytest.approx({"accuracy": 1.0, "matthews": 1.0, "f1": 1.0})
    inverted = compute_metrics(1 - labels, labels, 2)
    assert inverted == pytest.approx({"accuracy": 0.0, "matthews": -1.0, "f1": 0.0})


def test_constant_prediction_gives_zero_matthews_as_scikit_learn() -> None:
    # all predictions class 1: MCC's denominator has (TN + FN) = 0, so MCC is undefined; scikit-learn returns 0.0
    predictions, labels = np.ones(4, dtype=int), np.array([0, 1, 1, 0])
    metrics = compute_metrics(predictions, labels, 2)
    # F1 = 2*2 / (2*2 + 2 + 0) = 2/3
    assert metrics == pytest.approx({"accuracy": 0.5, "matthews": 0.0, "f1": 2 / 3})
    assert metrics["matthews"] == matthews_corrcoef(labels, predictions)
    assert metrics["f1"] == f1_score(labels, predictions)


def test_single_class_edge_cases_match_scikit_learn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented value, not a warning every epoch
        # labels and predictions all class 0: MCC 0.0; F1 of class 1 with no positive anywhere: 0.0 (zero_division)
        only_negative = compute_metrics(np.zeros(3, dtype=int), np.zeros(3, dtype=int), 2)
        # all class 1 and all right: MCC is still undefined (0.0), F1 = 1
        only_positive = compute_metrics(np.ones(3, dtype=int), np.ones(3, dtype=int), 2)
    assert only_negative == {"accuracy": 1.0, "matthews": 0.0, "f1": 0.0}
    assert only_positive == {"accuracy": 1.0, "matthews": 0.0, "f1": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert only_negative["matthews"] == matthews_corrcoef([0, 0, 0], [0, 0, 0])
        assert only_negative["f1"] == f1_score([0, 0, 0], [0, 0, 0])
        assert only_positive["f1"] == f1_score([1, 1, 1], [1, 1, 1])


def test_random_predictions_match_scikit_learn_and_scipy() -> None:
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    metrics = compute_metrics(predictions, labels, 2)
    assert metrics["matthews"] == pytest.approx(matthews_corrcoef(labels, predictions), rel=1e-12)
    assert metrics["f1"] == pytest.approx(f1_score(labels, predictions), rel=1e-12)
    labels3, predictions3 = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    metrics = compute_metrics(predictions3, labels3, 3)
    assert metrics["matthews"] == pytest.approx(matthews_corrcoef(labels3, predictions3), rel=1e-12)
    assert metrics["f1"] == pytest.approx(f1_score(labels3, predictions3, average="macro"), rel=1e-12)
    # STS-B-like scores rounded to 0.2 steps: many ties on both sides
    scores, targets = np.round(rng.uniform(0, 5, 60) * 5) / 5, np.round(rng.uniform(0, 5, 60) * 5) / 5
    metrics = compute_metrics(scores, targets, 1)
    assert metrics["pearson"] == pytest.approx(pearsonr(scores, targets)[0], rel=1e-12)
    assert metrics["spearman"] == pytest.approx(spearmanr(scores, targets)[0], rel=1e-12)


def test_three_classes() -> None:
    predictions = np.array([0, 1, 2, 2])
    labels = np.array([0, 1, 2, 1])
    # confusion (rows true, columns predicted): [[1,0,0],[0,1,1],[0,0,1]]; N = 4, correct c = 3
    # true counts t = (1, 2, 1), predicted counts p = (1, 1, 2); t.p = 1 + 2 + 2 = 5, p.p = 6, t.t = 6
    # R_K = (c*N - t.p) / sqrt((N^2 - p.p)(N^2 - t.t)) = (12 - 5) / sqrt(10 * 10) = 0.7
    # per-class F1 = 2TP / (predicted + actual): class 0: 2/2 = 1, class 1: 2/3, class 2: 2/3; macro = 7/9
    metrics = compute_metrics(predictions, labels, num_labels=3)
    assert metrics == pytest.approx({"accuracy": 0.75, "matthews": 0.7, "f1": 7 / 9})


def test_regression_pearson_and_spearman() -> None:
    predictions = np.array([[1.0], [2.0], [3.0], [4.0]])  # (N, 1), as a regression head returns
    labels = np.array([2.0, 4.0, 6.0, 9.0])
    # deviations: x - 2.5 = (-1.5, -0.5, 0.5, 1.5); y - 5.25 = (-3.25, -1.25, 0.75, 3.75)
    # sum dx*dy = 4.875 + 0.625 + 0.375 + 5.625 = 11.5; sum dx^2 = 5; sum dy^2 = 10.5625 + 1.5625 + 0.5625 + 14.0625
    # = 26.75; pearson = 11.5 / sqrt(5 * 26.75); both sides are increasing, so spearman = 1
    metrics = compute_metrics(predictions, labels, num_labels=1)
    assert metrics == pytest.approx({"pearson": 11.5 / math.sqrt(5 * 26.75), "spearman": 1.0})


def test_spearman_averages_ties() -> None:
    # ranks of x = (1, 2.5, 2.5, 4), of y = (1, 2, 3, 4): Pearson of the ranks
    # dx = (-1.5, 0, 0, 1.5), dy = (-1.5, -0.5, 0.5, 1.5): sum dx*dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5
    metrics = compute_metrics(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0]), 1)
    assert metrics["spearman"] == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert metrics["spearman"] == pytest.approx(spearmanr([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])[0], rel=1e-12)


def test_constant_regression_predictions_give_nan_as_scipy() -> None:
    # a constant side makes both correlations 0/0: scipy (and so the GLUE reference metric) returns nan, no warning
    # here; fewer than two pairs are undefined too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = compute_metrics(np.full(4, 2.5), np.array([1.0, 2.0, 3.0, 5.0]), 1)
        single = compute_metrics(np.array([1.0]), np.array([2.0]), 1)
    assert math.isnan(metrics["pearson"]) and math.isnan(metrics["spearman"])
    assert math.isnan(single["pearson"]) and math.isnan(single["spearman"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(pearsonr(np.full(4, 2.5), [1.0, 2.0, 3.0, 5.0])[0])
        assert math.isnan(spearmanr(np.full(4, 2.5), [1.0, 2.0, 3.0, 5.0])[0])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics(np.array([0, 1, 1]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        compute_metrics(np.array([0, 1]), np.array([0, -1]), 2)
    with pytest.raises(ValueError, match="empty"):
        compute_metrics(np.array([]), np.array([]), 2)


def test_main_metric() -> None:
    metrics = compute_metrics(np.array([1, 0]), np.array([1, 1]), 2)
    assert main_metric(metrics, "accuracy") == 0.5
    assert set(METRIC_NAMES) == {"accuracy", "matthews", "f1", "pearson", "spearman"}
    with pytest.raises(ValueError, match="'pearson' is not computed.*accuracy, matthews, f1"):
        main_metric(metrics, "pearson")


def test_best_epoch_selection_with_undefined_metrics() -> None:
    nan = math.nan
    assert improves(nan, None) and improves(0.1, None)  # the first epoch is the best so far, whatever it scored
    assert improves(0.2, nan)  # a defined score replaces an undefined one
    assert not improves(nan, 0.2) and not improves(nan, nan)  # an undefined score never replaces the best
    assert improves(0.3, 0.2) and not improves(0.2, 0.2) and not improves(-1.0, 0.2)

    def best_epoch(scores: list[float]) -> int:
        best, epoch = None, -1
        for i, score in enumerate(scores):
            if improves(score, best):
                best, epoch = score, i
        return epoch

    assert best_epoch([nan, 0.1, nan, 0.05]) == 1
    assert best_epoch([nan, nan]) == 0
