"""IsolationForest pipeline -> compact ONNX graph reproducing ``decision_function``.

skl2onnx emits about 27 nodes per tree (2,700 for 100 trees, ~1.7 ms per row). Here the whole forest is ONE
TreeEnsemble whose leaves hold their path length, summed over trees, followed by the score formula of
scikit-learn's ``IsolationForest``:

    score_samples     = -2 ** (-(sum of path lengths) / (n_trees * c(max_samples_)))
    decision_function = score_samples - offset_
    path length of a leaf = depth + c(n_node_samples of the leaf),  c = average path length of an
    unsuccessful BST search, as ``sklearn.ensemble._iforest._average_path_length``.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from sklearn.ensemble import IsolationForest

from edge_agent.errors import ExportError

from .graph import (Imputation, TreeLeaves, flatten_nodes, imputation_nodes, imputation_of, make_model, scalar,
                    tree_ensemble_node)

OUTPUT_NAME = "score"


def average_path_length(n_samples: np.ndarray) -> np.ndarray:
    """c(n): 0 for n <= 1, 1 for n == 2, else 2 (ln(n - 1) + Euler's gamma) - 2 (n - 1) / n."""
    n = np.asarray(n_samples, dtype=np.float64)
    safe = np.maximum(n, 3.0)
    general = 2.0 * (np.log(safe - 1.0) + np.euler_gamma) - 2.0 * (safe - 1.0) / safe
    return np.where(n <= 1, 0.0, np.where(n == 2, 1.0, general))


def isolation_forest_to_onnx(pipeline) -> onnx.ModelProto:
    """The compact graph of an imputer + IsolationForest pipeline: "readings" [N, F] -> "score" [N]."""
    imputer, forest = _imputer_and_forest(pipeline)
    imputation = imputation_of(imputer)
    if forest.n_features_in_ != len(imputation.columns):
        raise ExportError(f"the forest expects {forest.n_features_in_} features but the imputer yields "
                          f"{len(imputation.columns)}")
    if forest.max_samples_ < 2:
        raise ExportError(f"an isolation forest grown on max_samples_={forest.max_samples_} row per tree "
                          "cannot score anything; use at least 2")
    n_trees = len(forest.estimators_)
    denominator = n_trees * float(average_path_length(forest.max_samples_))

    nodes, initializers = imputation_nodes(imputation, "imputed", select_columns=False)
    nodes += [
        tree_ensemble_node(_path_length_trees(forest, imputation), "imputed", "path_length_sum"),
        helper.make_node("Mul", ["path_length_sum", "minus_inverse_denominator"], ["exponent"]),
        helper.make_node("Pow", ["two", "exponent"], ["anomaly"]),
        helper.make_node("Sub", ["minus_offset", "anomaly"], ["score_column"]),
    ]
    initializers += [scalar("minus_inverse_denominator", -1.0 / denominator), scalar("two", 2.0),
                     scalar("minus_offset", -float(forest.offset_))]
    flat_nodes, flat_initializers = flatten_nodes("score_column", OUTPUT_NAME)
    doc = (f"IsolationForest decision_function: {n_trees} trees, max_samples_={forest.max_samples_}, "
           f"offset_={float(forest.offset_)!r}; lower = more anomalous")
    return make_model(nodes + flat_nodes, initializers + flat_initializers, imputation.n_inputs, OUTPUT_NAME, doc,
                      uses_trees=True)


def _imputer_and_forest(pipeline) -> tuple:
    steps = getattr(pipeline, "steps", None)
    if steps is None or len(steps) != 2 or not isinstance(steps[-1][1], IsolationForest):
        found = [type(step).__name__ for _, step in steps] if steps else type(pipeline).__name__
        raise ExportError(f"expected Pipeline([SimpleImputer, IsolationForest]), got {found}")
    forest = steps[-1][1]
    if not hasattr(forest, "estimators_"):
        raise ExportError("the IsolationForest is not fitted")
    return steps[0][1], forest


def _path_length_trees(forest: IsolationForest, imputation: Imputation) -> list[TreeLeaves]:
    n_features = forest.n_features_in_
    trees = []
    for estimator, features in zip(forest.estimators_, forest.estimators_features_):
        tree = estimator.tree_
        # As scikit-learn scores: a tree sees X[:, features] only when fewer than all features were drawn.
        tree_columns = features if len(features) != n_features else np.arange(n_features)
        depth = tree.compute_node_depths() - 1  # scikit-learn counts the root as depth 1
        path_length = depth + average_path_length(tree.n_node_samples)
        trees.append(TreeLeaves(tree, imputation.columns[tree_columns], path_length))
    return trees
