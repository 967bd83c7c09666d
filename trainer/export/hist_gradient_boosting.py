"""HistGradientBoostingClassifier (binary) -> ONE TreeEnsemble node, then the logistic of the raw score.

scikit-learn predicts ``expit(baseline + sum of the trees' leaf values)``; each tree sends a reading left when
``float64(x) <= num_threshold`` (float64, midpoints between training bins) and a missing one to the side that
``missing_go_to_left`` names. The graph keeps both: thresholds are the largest float32 at or below each float64
threshold (graph.float32_at_or_below), and NaN follows the node's recorded side.

Behind a median imputer the graph does not impute at all: scikit-learn compares the float64 median with each
threshold, and a float32 copy of the median can sit on the other side of a threshold (a median of quantized
readings is the midpoint of two steps, which is exactly where histogram binning puts a threshold). So each node's
missing side is the side the imputed median takes there, decided in float64 at export, and NaN reaches the
TreeEnsemble as NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper, numpy_helper
from sklearn.ensemble import HistGradientBoostingClassifier

from edge_agent.errors import ExportError

from .graph import Imputation, TreeLeaves, tree_ensemble_node


@dataclass(frozen=True)
class _PredictorTree:
    """One HGB TreePredictor in the shape of sklearn.tree's Tree (children -1 at leaves), as TreeLeaves reads it."""
    children_left: np.ndarray    # int64 [node_count]
    children_right: np.ndarray   # int64 [node_count]
    feature: np.ndarray          # int64 [node_count]: the model's feature index
    threshold: np.ndarray        # float64 [node_count]: num_threshold, x <= threshold goes left

    @property
    def node_count(self) -> int:
        return int(self.children_left.shape[0])


def hist_gradient_boosting_nodes(model: HistGradientBoostingClassifier, imputation: Imputation | None,
                                 output: str) -> tuple[list, list]:
    """Nodes computing ``output`` [N, 1] = predict_proba[:, 1] from the graph input "readings".

    ``imputation``: the median imputer in front of the model (its columns and fill values), or None when the
    model gets the readings as they are and routes NaN itself.
    """
    _check_exportable(model)
    columns = imputation.columns if imputation is not None else np.arange(model.n_features_in_, dtype=np.int64)
    trees = [_tree_leaves(predictor.nodes, columns, imputation)
             for predictors in model._predictors for predictor in predictors]
    nodes = [tree_ensemble_node(trees, "readings", "raw_score"),
             helper.make_node("Add", ["raw_score", "baseline_prediction"], ["raw_score_with_baseline"]),
             helper.make_node("Sigmoid", ["raw_score_with_baseline"], [output])]
    baseline = np.asarray(model._baseline_prediction, np.float64).reshape(1, 1)
    return nodes, [numpy_helper.from_array(baseline.astype(np.float32), "baseline_prediction")]


def _check_exportable(model: HistGradientBoostingClassifier) -> None:
    if model.n_trees_per_iteration_ != 1 or type(model._loss).__name__ != "HalfBinomialLoss":
        raise ExportError(f"expected a binary HistGradientBoostingClassifier (one tree per iteration, log loss), got "
                          f"{model.n_trees_per_iteration_} trees per iteration and {type(model._loss).__name__}")
    categorical = model.is_categorical_
    if (categorical is not None and np.any(categorical)) or any(
            np.any(predictor.nodes["is_categorical"]) for predictors in model._predictors for predictor in predictors):
        features = [] if categorical is None else np.flatnonzero(categorical).tolist()
        raise ExportError(f"the HistGradientBoostingClassifier has categorical splits (categorical features "
                          f"{features}); the ONNX export supports numeric splits only: fit it with "
                          "categorical_features=None")


def _tree_leaves(nodes: np.ndarray, columns: np.ndarray, imputation: Imputation | None) -> TreeLeaves:
    is_leaf = nodes["is_leaf"].astype(bool)
    feature = nodes["feature_idx"].astype(np.int64)
    threshold = nodes["num_threshold"].astype(np.float64)
    tree = _PredictorTree(children_left=np.where(is_leaf, -1, nodes["left"].astype(np.int64)),
                          children_right=np.where(is_leaf, -1, nodes["right"].astype(np.int64)),
                          feature=feature, threshold=threshold)
    if imputation is None:
        missing_goes_left = nodes["missing_go_to_left"].astype(bool)
    else:
        # The imputed value, in float64 as scikit-learn compares it (see the module docstring).
        missing_goes_left = imputation.fill[columns[feature]] <= threshold
    return TreeLeaves(tree, columns, nodes["value"].astype(np.float64), missing_goes_left=missing_goes_left)
