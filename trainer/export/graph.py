"""ONNX building blocks shared by the outlier and yield graphs: input, imputation, tree encoding, output.

Every graph takes one float32 input "readings" [N, F] with NaN for a missing reading, imputes inside the
graph with the fitted imputer's statistics, and ends in one float32 output of shape [N].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_agent.errors import ExportError

INPUT_NAME = "readings"
OPSET = 17
# TreeEnsemble (ai.onnx.ml 5) stores leaves apart from split nodes: about 2.6x smaller than
# TreeEnsembleRegressor (ai.onnx.ml 3) for the same forest and equally fast in onnxruntime 1.32.
ML_OPSET = 5
_BRANCH_LEQ = 0
_AGGREGATE_SUM = 1
_POST_TRANSFORM_NONE = 0


@dataclass(frozen=True)
class Imputation:
    """What a fitted SimpleImputer does, as arrays the graph can carry."""
    fill: np.ndarray      # float64 [F_in]: value that replaces NaN in each input column
    columns: np.ndarray   # int64 [F_model]: input column behind each feature the next step sees

    @property
    def n_inputs(self) -> int:
        return int(self.fill.shape[0])

    @property
    def drops_columns(self) -> bool:
        return not np.array_equal(self.columns, np.arange(self.n_inputs))


def imputation_of(imputer) -> Imputation:
    """Read a fitted SimpleImputer; refuse settings the graphs do not reproduce."""
    if type(imputer).__name__ != "SimpleImputer":
        raise ExportError(f"the first pipeline step must be a SimpleImputer, got {type(imputer).__name__}")
    missing = imputer.missing_values
    if not (isinstance(missing, float) and np.isnan(missing)):
        raise ExportError(f"the imputer must treat NaN as missing, got missing_values={missing!r}")
    if imputer.add_indicator:
        raise ExportError("imputers with add_indicator=True are not supported by the ONNX export")
    statistics = np.asarray(imputer.statistics_, dtype=np.float64)
    # SimpleImputer drops columns it never saw a value in, unless keep_empty_features is set.
    kept = np.ones(statistics.shape, bool) if imputer.keep_empty_features else ~np.isnan(statistics)
    return Imputation(fill=np.where(kept, statistics, 0.0),
                      columns=np.flatnonzero(kept).astype(np.int64))


def imputation_nodes(imputation: Imputation, output: str, *, select_columns: bool,
                     precision: type = np.float32) -> tuple[list, list]:
    """Nodes computing ``output`` = readings with NaN replaced, in ``precision`` (float32 or float64).

    With ``select_columns`` also drop the columns the imputer drops (dense models); tree models instead
    index input columns directly. float64 is for dense models: scikit-learn imputes and scales in float64,
    and a float32 median or mean of readings near 1e9 would be off by more than the fidelity allows.
    """
    imputed = output if not (select_columns and imputation.drops_columns) else f"{output}_all"
    readings = INPUT_NAME
    nodes = [helper.make_node("IsNaN", [INPUT_NAME], ["readings_missing"])]
    if precision is np.float64:
        readings = "readings_double"
        nodes.append(helper.make_node("Cast", [INPUT_NAME], [readings], to=TensorProto.DOUBLE))
    elif precision is not np.float32:
        raise ValueError(f"imputation precision must be np.float32 or np.float64, got {precision!r}")
    nodes.append(helper.make_node("Where", ["readings_missing", "impute_fill", readings], [imputed]))
    initializers = [numpy_helper.from_array(imputation.fill.astype(precision), "impute_fill")]
    if imputed != output:
        nodes.append(helper.make_node("Gather", [imputed, "impute_columns"], [output], axis=1))
        initializers.append(numpy_helper.from_array(imputation.columns, "impute_columns"))
    return nodes, initializers


def float32_at_or_below(values: np.ndarray) -> np.ndarray:
    """Largest float32 <= each float64 value.

    scikit-learn trees compare float32(x) <= float64 threshold; for float32 x that is exactly
    x <= (the largest float32 not above the threshold), so rounding down keeps every split decision.
    """
    rounded = values.astype(np.float32)
    above = rounded.astype(np.float64) > values
    rounded[above] = np.nextafter(rounded[above], np.float32(-np.inf))
    return rounded


@dataclass(frozen=True)
class TreeLeaves:
    """One fitted scikit-learn tree with the value each of its leaves adds to the ensemble sum."""
    tree: object               # sklearn.tree._tree.Tree, or the same arrays (children_left/right, feature, threshold)
    input_columns: np.ndarray  # graph input column for each feature index the tree uses
    node_values: np.ndarray    # float64 [node_count]; read at leaves only
    # bool [node_count], read at splits: a NaN reading takes the x <= threshold side. None: the input has no NaN
    # (imputed before the node), and the node is left without the attribute.
    missing_goes_left: np.ndarray | None = None


def tree_ensemble_node(trees: list[TreeLeaves], input_name: str, output: str) -> onnx.NodeProto:
    """One ai.onnx.ml TreeEnsemble node summing the leaf values of all trees: output [N, 1]."""
    splits, features, true_ids, true_leaf, false_ids, false_leaf, roots, weights, missing_true = (
        [] for _ in range(9))
    n_splits = n_leaves = 0
    for item in trees:
        tree = item.tree
        left, right = tree.children_left, tree.children_right
        is_leaf = left == -1
        inner = np.flatnonzero(~is_leaf)
        leaves = np.flatnonzero(is_leaf)
        split_id = np.full(tree.node_count, -1, np.int64)
        split_id[inner] = n_splits + np.arange(len(inner))
        leaf_id = np.full(tree.node_count, -1, np.int64)
        leaf_id[leaves] = n_leaves + np.arange(len(leaves))
        weights.append(item.node_values[leaves])
        if len(inner) == 0:
            # A tree that is one leaf (e.g. identical training rows): a split whose both sides are that leaf.
            roots.append(n_splits)
            splits.append(np.zeros(1))
            features.append(np.zeros(1, np.int64))
            true_ids.append(leaf_id[[0]])
            false_ids.append(leaf_id[[0]])
            true_leaf.append(np.ones(1, np.int64))
            false_leaf.append(np.ones(1, np.int64))
            missing_true.append(np.zeros(1, np.int64))
            n_splits += 1
        else:
            roots.append(int(split_id[0]))
            lo, hi = left[inner], right[inner]
            splits.append(tree.threshold[inner])
            features.append(item.input_columns[tree.feature[inner]])
            true_ids.append(np.where(is_leaf[lo], leaf_id[lo], split_id[lo]))
            false_ids.append(np.where(is_leaf[hi], leaf_id[hi], split_id[hi]))
            true_leaf.append(is_leaf[lo].astype(np.int64))
            false_leaf.append(is_leaf[hi].astype(np.int64))
            missing_true.append(np.zeros(len(inner), np.int64) if item.missing_goes_left is None
                                else item.missing_goes_left[inner].astype(np.int64))
            n_splits += len(inner)
        n_leaves += len(leaves)

    def joined(parts: list) -> list[int]:
        return np.concatenate(parts).astype(np.int64).tolist()

    # Written only when some tree routes NaN, so graphs of imputed input keep their bytes.
    missing = ({"nodes_missing_value_tracks_true": joined(missing_true)}
               if any(item.missing_goes_left is not None for item in trees) else {})
    return helper.make_node(
        "TreeEnsemble", [input_name], [output], domain="ai.onnx.ml",
        n_targets=1, aggregate_function=_AGGREGATE_SUM, post_transform=_POST_TRANSFORM_NONE,
        tree_roots=roots,
        nodes_featureids=joined(features),
        nodes_splits=numpy_helper.from_array(float32_at_or_below(np.concatenate(splits)), "nodes_splits"),
        nodes_modes=numpy_helper.from_array(np.full(n_splits, _BRANCH_LEQ, np.uint8), "nodes_modes"),
        nodes_truenodeids=joined(true_ids), nodes_trueleafs=joined(true_leaf),
        nodes_falsenodeids=joined(false_ids), nodes_falseleafs=joined(false_leaf),
        leaf_targetids=[0] * n_leaves,
        leaf_weights=numpy_helper.from_array(np.concatenate(weights).astype(np.float32), "leaf_weights"),
        **missing)


def scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def flatten_nodes(column: str, output: str) -> tuple[list, list]:
    """[N, 1] -> [N]."""
    return ([helper.make_node("Reshape", [column, "flat_shape"], [output])],
            [numpy_helper.from_array(np.array([-1], np.int64), "flat_shape")])


def make_model(nodes: list, initializers: list, n_inputs: int, output: str, doc: str,
               *, uses_trees: bool) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, output, [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, n_inputs])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None])], initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    if uses_trees:
        opsets.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="trainer.export", doc_string=doc)
    onnx.checker.check_model(model)
    return model
