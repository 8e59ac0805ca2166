"""Central evaluation of the global model on the server's held-out test set."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm

__all__ = ["classification_metrics"]


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro P/R/F1, one-vs-rest ROC-AUC, log-loss and confusion matrix.

    All from ``sklearn.metrics``. ROC-AUC is ``nan`` when the test set lacks a
    class (it is undefined there).
    """
    num_classes = probs.shape[1]
    labels = np.arange(num_classes)
    pred = probs.argmax(axis=1)
    p, r, f1, _ = skm.precision_recall_fscore_support(
        y_true, pred, labels=labels, average="macro", zero_division=0
    )
    present = np.unique(y_true)
    if len(present) < num_classes or len(present) < 2:
        auc = float("nan")
    elif num_classes == 2:
        auc = float(skm.roc_auc_score(y_true, probs[:, 1]))
    else:
        auc = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=labels))
    clipped = np.clip(probs, 1e-12, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    return {
        "accuracy": float(skm.accuracy_score(y_true, pred)),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f1),
        "roc_auc_ovr": auc,
        "loss": float(skm.log_loss(y_true, clipped, labels=labels)),
        "confusion_matrix": skm.confusion_matrix(y_true, pred, labels=labels).tolist(),
    }
