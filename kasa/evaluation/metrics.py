"""GLUE metrics from predictions and labels, computed with the libraries that the GLUE reference metric itself wraps:
scikit-learn's `matthews_corrcoef` and `f1_score`, scipy's `pearsonr` and `spearmanr`.

Classification reports accuracy, Matthews correlation (CoLA's metric) and F1 (MRPC/QQP's); regression reports
Pearson (STS-B's) and Spearman correlation. `main_metric` picks the one that selects the best epoch.

Where a metric is undefined the value is the reference's: Matthews correlation is 0.0 when all predictions or all
labels are one class (scikit-learn), F1 is 0.0 when the positive class is neither predicted nor present
(scikit-learn's zero_division), and Pearson and Spearman are nan when either side is constant (scipy) or there are
fewer than two pairs. `improves` keeps such an epoch from displacing a defined best."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

# Metrics that are not fractions, printed as they are where the others are scaled (--metric-scale 100): E2E's NIST
# and CIDEr (table 12 prints them beside BLEU x 100) and the LLM judge's 1-10 score (table 2)
UNSCALED_METRICS = ("NIST", "CIDEr", "judge_score")
CLASSIFICATION_METRICS = ("accuracy", "matthews", "f1")
REGRESSION_METRICS = ("pearson", "spearman")
METRIC_NAMES: tuple[str, ...] = CLASSIFICATION_METRICS + REGRESSION_METRICS


def task_metrics(kind: str, num_labels: int, eval_sets: Sequence[str] = ()) -> tuple[str, ...]:
    """The metrics a task computes (what its `task.metric` may name), checked when a run starts: GLUE's by its
    number of labels, E2E's official set, the mean LLM-judge score, or each commonsense set's accuracy and their
    average."""
    if kind == "glue":
        return CLASSIFICATION_METRICS if num_labels >= 2 else REGRESSION_METRICS
    if kind == "e2e":
        from kasa.evaluation.e2e_metrics import E2E_METRIC_NAMES

        return E2E_METRIC_NAMES
    if kind == "instruction":
        return ("judge_score",)
    if kind == "commonsense":
        from kasa.evaluation.commonsense import COMMONSENSE_TASKS

        return ("average", *(eval_sets or COMMONSENSE_TASKS))
    raise ValueError(f"unknown task.kind {kind!r}")  # kasa.config.validate names the kinds before this


def metric_scale(metric: str, scale: float) -> float:
    """The factor a table or plot scaled by `scale` applies to `metric`: 1 for UNSCALED_METRICS."""
    return 1.0 if metric in UNSCALED_METRICS else scale


def compute_metrics(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Metrics of one evaluation pass.

    Classification (`num_labels >= 2`): `predictions` are logits (N, C) or class ids (N,); returns accuracy,
    matthews (multi-class Matthews correlation) and f1 (F1 of class 1 when binary, macro F1 over the classes
    otherwise). Regression (`num_labels == 1`): `predictions` are scores (N,) or (N, 1); returns pearson and
    spearman."""
    predictions, labels = np.asarray(predictions), np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError("compute_metrics got no labels; the evaluation split is empty")
    if num_labels == 1:
        scores = predictions.reshape(-1).astype(np.float64)
        _check_lengths(scores, labels)
        return _correlations(scores, labels.astype(np.float64))
    if num_labels < 1:
        raise ValueError(f"num_labels={num_labels}: use 1 for regression or the number of classes")
    ids = predictions.argmax(axis=-1) if predictions.ndim == 2 else predictions.reshape(-1)
    ids, labels = ids.astype(np.int64), labels.astype(np.int64)
    _check_lengths(ids, labels)
    for name, values in (("predicted class", ids), ("label", labels)):
        if values.min() < 0 or values.max() >= num_labels:
            raise ValueError(f"a {name} lies outside 0..{num_labels - 1}; check num_labels and unlabeled rows (-1)")
    # scikit-learn and scipy are imported here, not at the top: ~1.5 s that every command's start would pay
    from sklearn.metrics import f1_score, matthews_corrcoef

    with warnings.catch_warnings():
        # "a single label was found": the value (0.0) is documented above, the warning would repeat every epoch
        warnings.simplefilter("ignore", UserWarning)
        matthews = float(matthews_corrcoef(labels, ids))
    # GLUE's F1 is the positive class's (MRPC, QQP); with more classes, the macro mean over the classes present
    f1 = f1_score(labels, ids, average="binary" if num_labels == 2 else "macro", zero_division=0.0)
    return {"accuracy": float(np.mean(ids == labels)), "matthews": matthews, "f1": float(f1)}


def main_metric(metrics: dict[str, float], name: str) -> float:
    """The value of metric `name` in `metrics` (the task's `metric`, which selects the best epoch). A name that the
    task cannot compute fails when a run starts (`task_metrics`, checked by kasa.config.validate); this guards the
    evaluation of an older run's saved config."""
    if name not in metrics:
        raise ValueError(f"metric '{name}' is not computed for this task; it computes {', '.join(metrics)}")
    return float(metrics[name])


def improves(score: float, best: float | None) -> bool:
    """Whether an epoch's `score` becomes the best so far (`best` None: no epoch yet). The first score always does,
    so a run whose metric is never defined still has a best epoch; after that a nan (an undefined metric, e.g. the
    correlation of a constant prediction) never replaces a number, and a number always replaces a nan."""
    if best is None:
        return True
    if math.isnan(score):
        return False
    return math.isnan(best) or score > best


def _check_lengths(predictions: np.ndarray, labels: np.ndarray) -> None:
    if predictions.shape[0] != labels.shape[0]:
        raise ValueError(f"{predictions.shape[0]} predictions for {labels.shape[0]} labels")


def _correlations(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman (Pearson of the ranks, ties at their average rank) as scipy computes them; nan when
    they are undefined (a constant side, or fewer than two pairs), as in the GLUE reference metric."""
    if scores.size < 2:
        return {"pearson": math.nan, "spearman": math.nan}
    from scipy.stats import ConstantInputWarning, pearsonr, spearmanr  # here, as scikit-learn in compute_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)  # the nan result says it
        return {"pearson": float(pearsonr(scores, targets)[0]), "spearman": float(spearmanr(scores, targets)[0])}
