"""Yield pipeline -> compact ONNX graph reproducing ``predict_proba[:, 1]`` (the pass probability).

Accepted pipelines are the ones ``trainer.train`` builds: a median SimpleImputer, an optional StandardScaler,
then a RandomForestClassifier, HistGradientBoostingClassifier, LogisticRegression or MLPClassifier; also a
HistGradientBoostingClassifier alone (it routes missing readings itself).

- Random forest: ONE TreeEnsemble whose leaves hold (class-1 fraction of the leaf) / n_trees, summed over
  trees; that sum is exactly scikit-learn's average of the trees' probabilities.
- Histogram gradient boosting: ONE TreeEnsemble summing the trees' leaf values, + baseline, Sigmoid
  (hist_gradient_boosting.py: how missing readings and float32 thresholds keep every split's decision).
- Logistic regression and MLP: imputation and scaling in float64 (as scikit-learn does them: a float32 mean
  of readings near 1e9 would be off by tens), then a chain of float32 dense layers, each MatMul + Add +
  activation. MatMul (rather than skl2onnx's LinearClassifier op) is what onnxruntime's int8 quantizer covers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from edge_agent.errors import ExportError

from .graph import (Imputation, TreeLeaves, flatten_nodes, imputation_nodes, imputation_of, make_model,
                    tree_ensemble_node)
from .hist_gradient_boosting import hist_gradient_boosting_nodes

OUTPUT_NAME = "pass_probability"
MODEL_TYPES = (RandomForestClassifier, HistGradientBoostingClassifier, LogisticRegression, MLPClassifier)
TREE_TYPES = (RandomForestClassifier, HistGradientBoostingClassifier)
# scikit-learn activation name -> ONNX operator ("identity" needs none).
_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "logistic": "Sigmoid", "identity": None}


@dataclass(frozen=True)
class _Dense:
    weights: np.ndarray   # [inputs, outputs]
    bias: np.ndarray      # [outputs]
    activation: str       # key of _ACTIVATIONS


def yield_model_to_onnx(pipeline) -> onnx.ModelProto:
    """The graph of an imputer (+ scaler) + classifier pipeline: "readings" [N, F] -> "pass_probability" [N]."""
    imputer, scaler, model = _steps(pipeline)
    imputation = imputation_of(imputer) if imputer is not None else None
    if imputation is not None and model.n_features_in_ != len(imputation.columns):
        raise ExportError(f"the {type(model).__name__} expects {model.n_features_in_} features but the imputer "
                          f"yields {len(imputation.columns)}")
    classes = np.asarray(model.classes_)
    if len(classes) != 2 or classes[1] != 1:
        raise ExportError(f"the yield model must be a binary classifier with classes [0, 1] (1 = pass), "
                          f"got classes {classes.tolist()}")

    if scaler is not None and isinstance(model, TREE_TYPES):
        raise ExportError(f"a scaler before a {type(model).__name__} is not supported: trees do not need scaling")
    if isinstance(model, HistGradientBoostingClassifier):
        nodes, initializers = hist_gradient_boosting_nodes(model, imputation, "probability_column")
        doc = f"HistGradientBoostingClassifier predict_proba[:, 1]: {model.n_iter_} trees"
    elif isinstance(model, RandomForestClassifier):
        nodes, initializers = imputation_nodes(imputation, "imputed", select_columns=False)
        nodes.append(tree_ensemble_node(_pass_fraction_trees(model, imputation), "imputed", "probability_column"))
        doc = f"RandomForestClassifier predict_proba[:, 1]: {len(model.estimators_)} trees"
    else:
        nodes, initializers = imputation_nodes(imputation, "imputed", select_columns=True, precision=np.float64)
        features = "imputed"
        if scaler is not None:
            scale_nodes, scale_initializers, features = _scaler_nodes(scaler, features)
            nodes += scale_nodes
            initializers += scale_initializers
        nodes.append(helper.make_node("Cast", [features], ["features"], to=TensorProto.FLOAT))
        layers = _dense_layers(model)
        dense_nodes, dense_initializers = _dense_nodes(layers, "features", "probability_column")
        nodes += dense_nodes
        initializers += dense_initializers
        doc = (f"{type(model).__name__} predict_proba[:, 1]: dense layers "
               f"{[layer.weights.shape[0] for layer in layers] + [1]}")
    flat_nodes, flat_initializers = flatten_nodes("probability_column", OUTPUT_NAME)
    n_inputs = imputation.n_inputs if imputation is not None else model.n_features_in_
    return make_model(nodes + flat_nodes, initializers + flat_initializers, n_inputs, OUTPUT_NAME,
                      doc + "; probability of class 1 (pass)", uses_trees=isinstance(model, TREE_TYPES))


def _steps(pipeline) -> tuple:
    """(imputer or None, scaler or None, classifier) of a fitted pipeline, or ExportError naming what was found.

    Only a HistGradientBoostingClassifier may come without an imputer: it routes missing readings itself.
    """
    steps = getattr(pipeline, "steps", None)
    found = [type(step).__name__ for _, step in steps] if steps else type(pipeline).__name__
    expected = ("Pipeline([SimpleImputer, StandardScaler (optional), RandomForestClassifier | "
                "HistGradientBoostingClassifier | LogisticRegression | MLPClassifier]) or "
                "Pipeline([HistGradientBoostingClassifier])")
    if steps is None or not isinstance(steps[-1][1], MODEL_TYPES):
        raise ExportError(f"expected {expected}, got {found}")
    if len(steps) == 1 and isinstance(steps[0][1], HistGradientBoostingClassifier):
        return None, None, _fitted(steps[0][1])
    if len(steps) not in (2, 3):
        raise ExportError(f"expected {expected}, got {found}")
    scaler = steps[1][1] if len(steps) == 3 else None
    if scaler is not None and not isinstance(scaler, StandardScaler):
        raise ExportError(f"expected {expected}, got {found}")
    return steps[0][1], scaler, _fitted(steps[-1][1])


def _fitted(model):
    if not hasattr(model, "classes_"):
        raise ExportError(f"the {type(model).__name__} is not fitted")
    return model


def _pass_fraction_trees(forest: RandomForestClassifier, imputation: Imputation) -> list[TreeLeaves]:
    if forest.n_outputs_ != 1:
        raise ExportError(f"the random forest predicts {forest.n_outputs_} outputs; the yield model needs one")
    n_trees = len(forest.estimators_)
    trees = []
    for estimator in forest.estimators_:
        tree = estimator.tree_
        value = tree.value[:, 0, :]
        # As DecisionTreeClassifier.predict_proba: normalise each leaf's class weights to fractions.
        totals = value.sum(axis=1)
        pass_fraction = np.divide(value[:, 1], totals, out=np.zeros(len(value)), where=totals > 0)
        trees.append(TreeLeaves(tree, imputation.columns, pass_fraction / n_trees))
    return trees


def _scaler_nodes(scaler: StandardScaler, features: str) -> tuple[list, list, str]:
    """(x - mean_) / scale_ in float64 as scikit-learn computes it; returns nodes, initializers, result name."""
    nodes, initializers, current = [], [], features
    for enabled, op, values, result in ((scaler.with_mean, "Sub", scaler.mean_, "centred"),
                                        (scaler.with_std, "Div", scaler.scale_, "scaled")):
        if enabled:
            nodes.append(helper.make_node(op, [current, f"{result}_by"], [result]))
            initializers.append(numpy_helper.from_array(np.asarray(values, np.float64), f"{result}_by"))
            current = result
    return nodes, initializers, current


def _dense_layers(model) -> list[_Dense]:
    """The model as dense layers whose last one outputs the class-1 probability in one column."""
    if isinstance(model, LogisticRegression):
        if model.coef_.shape[0] != 1:
            raise ExportError(f"expected one row of logistic coefficients, got {model.coef_.shape[0]}")
        return [_Dense(model.coef_.T, model.intercept_, "logistic")]
    if model.out_activation_ != "logistic":
        raise ExportError(f"expected an MLP with a logistic output (binary), got {model.out_activation_!r}")
    hidden = [_Dense(w, b, model.activation) for w, b in zip(model.coefs_[:-1], model.intercepts_[:-1])]
    return hidden + [_Dense(model.coefs_[-1], model.intercepts_[-1], "logistic")]


def _dense_nodes(layers: list[_Dense], features: str, output: str) -> tuple[list, list]:
    nodes, initializers = [], []
    current = features
    for i, layer in enumerate(layers):
        name = f"layer{i}"
        last = i == len(layers) - 1
        activation = _ACTIVATIONS[layer.activation]
        summed = f"{name}_sum"
        result = output if last else f"{name}_out"
        nodes += [helper.make_node("MatMul", [current, f"{name}_weights"], [f"{name}_product"]),
                  helper.make_node("Add", [f"{name}_product", f"{name}_bias"], [summed if activation else result])]
        if activation:
            nodes.append(helper.make_node(activation, [summed], [result]))
        initializers += [numpy_helper.from_array(np.asarray(layer.weights, np.float32), f"{name}_weights"),
                         numpy_helper.from_array(np.asarray(layer.bias, np.float32), f"{name}_bias")]
        current = result
    return nodes, initializers
