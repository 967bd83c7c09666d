"""The model card: what a test engineer reads before putting a package into production."""
from __future__ import annotations

from collections import Counter

from edge_agent.package.manifest import Manifest

MAX_PAT_ROWS = 30


def render_model_card(manifest: Manifest) -> str:
    outlier = manifest.models.outlier
    yield_model = manifest.models.yield_model
    lineage = manifest.lineage
    lines = [
        f"# Model card: {manifest.name}",
        "",
        f"Created {manifest.created_at} by code {lineage.code_version} from {lineage.rows:,} parts "
        f"({lineage.train_rows:,} for training, {lineage.holdout_rows:,} held out"
        + ("; the outlier model's held-out parts are a random share, the yield model's are below)."
           if manifest.held_out is not None else ")."),
        "",
        *_gate_warning(yield_model),
        "## What it decides",
        "",
        f"- **Outlier score** (Isolation Forest, {outlier.params.get('n_estimators')} trees, trained on "
        f"{outlier.trained_on or 'passing'} parts). A part is an outlier when its score is below "
        f"**{outlier.threshold:.5f}**, calibrated so that {outlier.target_outlier_rate:.2%} of passing "
        "training parts fall below it. Lower scores are more unusual.",
        f"- **Pass probability** ({yield_model.kind.replace('_', ' ')}, label `{yield_model.label}`). "
        f"Predicted fail below **{yield_model.threshold:.4g}**.",
        f"- **Static PAT limits** for {sum(1 for p in manifest.pat.limits if p.low is not None)} tests: "
        f"median +/- {manifest.pat.k_sigma:g} robust sigma (IQR/1.35) over passing training parts, by each test's "
        "shape (below).",
        "",
        *_yield_label_section(manifest),
        "## How well it does (held-out parts)",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    om, ym = manifest.metrics.outlier, manifest.metrics.yield_model
    rows = [
        ("outlier rate, passing parts", _pct(om.get("holdout_outlier_rate_passing"))),
        ("outlier rate, failing parts", _pct(om.get("holdout_outlier_rate_failing"))),
        ("latent-outlier recall (synthetic ground truth)", _pct(om.get("latent_outlier_recall"))),
        ("yield ROC AUC (every held-out part)", _num(ym.get("roc_auc"))),
        ("yield F1 (fail class), evaluation parts", _num(ym.get("f1_fail_class"))),
        ("yield fail precision / recall, evaluation parts",
         "n/a" if ym.get("fail_precision") is None and ym.get("fail_recall") is None
         else f"{_pct(ym.get('fail_precision'))} / {_pct(ym.get('fail_recall'))}"),
        ("yield Brier score", _num(ym.get("brier"))),
        ("held-out pass rate", _pct(ym.get("holdout_pass_rate"))),
    ]
    lines += [f"| {name} | {value} |" for name, value in rows if value != "n/a"]
    lines += ["", "## Calibration of the pass probability (held-out parts)", "",
              "| predicted | parts | mean predicted | observed pass rate |", "|---|---|---|---|"]
    lines += [f"| {c['bin']} | {c['parts']} | {_num(c['mean_predicted'])} | {_num(c['observed_pass_rate'])} |"
              for c in ym.get("calibration", []) if c["parts"]]
    lines += _static_pat(manifest)
    lines += ["", "## ONNX graphs and their fidelity to scikit-learn", "",
              "| graph | rows checked | max abs difference | decisions agreeing |", "|---|---|---|---|"]
    lines += [f"| {f.file} | {f.rows:,} | {f.max_abs_diff:.2e} | {f.decision_agreement:.4%} |"
              for f in manifest.fidelity.values()]
    lines += ["", "## Quantization", "",
              f"- Outlier model: {outlier.quantization.reason}",
              f"- Yield model: {yield_model.quantization.reason}",
              "", "## Inputs", "",
              f"{len(manifest.features)} readings in this order (missing readings are NaN; they are replaced by "
              "the training median inside the graph). First ten:", "",
              "| # | test | units | low | high | imputed with |", "|---|---|---|---|---|---|"]
    lines += [f"| {f.index} | {f.column} | {f.units} | {_num(f.low)} | {_num(f.high)} | {_num(f.impute)} |"
              for f in manifest.features[:10]]
    findings = manifest.validation.get("findings", [])
    lines += ["", "## Data problems found at training", ""]
    lines += [f"- {f['severity']}: {f['message']}" for f in findings[:30]] or ["- none"]
    if len(findings) > 30:
        lines.append(f"- ... and {len(findings) - 30} more in the manifest")
    lines += ["", "## Limits of this model", "",
              "- It knows only the tests, products and conditions of its training data; drift statistics in the "
              "agent compare every reading with the training distribution and say when that stops holding.",
              "- The outlier threshold fixes the rate of flagged passing parts, not which defects are real: compare "
              "with PAT and with failure analysis before binning parts out.",
              ""]
    return "\n".join(lines)


def _static_pat(manifest: Manifest) -> list[str]:
    """Shapes, the resolution floor, and every test the self-check widened or disabled or whose spread differs
    between training lots, with why."""
    pat, limits = manifest.pat, manifest.pat.limits
    shapes = Counter(limit.shape or limit.scale for limit in limits)
    lines = ["", "## Static PAT: rules and self-check", "",
             "Rule per test by the shape of its passing training readings: "
             + ", ".join(f"{shape} {count}" for shape, count in shapes.most_common()) + "."]
    if pat.max_flag_rate is None:
        return lines   # a package written before the self-check
    actions = Counter(limit.self_check for limit in limits)
    excess = "widened to that rate" if pat.on_excess == "widen" else "disabled"
    lines += [f"Every robust sigma is at least {pat.resolution_floor:g} x the test's measurement resolution (its "
              "smallest step between distinct readings); a test whose robust sigma differs between training lots "
              "takes its widest lot's. Self-check: a test whose limits flag more than "
              f"{pat.max_flag_rate:.2%} of the passing training parts is {excess} (disabled when widening needs "
              f"more than 3 x k). Widened: {actions['widened']}, disabled: {actions['disabled']}.", ""]
    listed = [limit for limit in limits if limit.self_check in ("widened", "disabled")
              or (limit.reason and "between training lots" in limit.reason)]
    if not listed:
        return lines + ["No test needed widening or disabling."]
    lines += ["| test | shape | resolution | action | flagged before -> after | why |", "|---|---|---|---|---|---|"]
    lines += [f"| {limit.column} | {limit.shape} | {_num(limit.resolution)} | {limit.self_check} | "
              f"{_pct(limit.flag_rate_before)} -> {_pct(limit.flag_rate)} | {limit.reason} |"
              for limit in listed[:MAX_PAT_ROWS]]
    return lines + (["", f"... and {len(listed) - MAX_PAT_ROWS} more in manifest.pat.limits"]
                    if len(listed) > MAX_PAT_ROWS else [])


def _gate_warning(yield_model) -> list[str]:
    gate = yield_model.gate
    if gate is None or gate.passed:
        return []
    return [f"> **Warning: {gate.reason}.** This package was published as a candidate; the registry refuses to "
            "promote it to staging or production unless forced with a reason (`--force`), which the history "
            "records.", ""]


def _yield_label_section(manifest: Manifest) -> list[str]:
    """What the pass probability predicts and how it was graded (packages written before these fields: nothing)."""
    yield_model, held_out = manifest.models.yield_model, manifest.held_out
    label, choice = yield_model.label_source, yield_model.threshold_choice
    lines = []
    if label is not None:
        lines += ["## What the yield model learned", "", f"The label is {label.meaning}", ""]
        join = label.outcomes
        if join:
            lines += [f"- Outcomes joined on {', '.join(join['join_on'])}: {join['matched']:,} of "
                      f"{join['training_parts']:,} training parts matched; {join['training_without_outcome']:,} "
                      f"without an outcome ({join['training_without_outcome_failed_here']:,} of them failed this "
                      f"step); {join['outcomes_without_part']:,} outcomes without a training part; "
                      f"{join['duplicate_outcomes']:,} parts with more than one outcome (the last counts)."]
    if held_out is not None:
        lots = f" Held-out lots: {', '.join(held_out.held_out_lots)}." if held_out.held_out_lots else ""
        lines += [f"- Held out ({held_out.split} split, {held_out.parts:,} parts): {held_out.reason}.{lots}"]
    if choice is not None:
        lines += [f"- Threshold {yield_model.threshold:.4g} chosen for `{choice.objective}` on "
                  f"{choice.tuning_parts:,} held-out parts: {choice.note}. Threshold-dependent measures below come "
                  f"from the other {choice.evaluation_parts:,} held-out parts."]
    if yield_model.gate is not None:
        lines += [f"- Against chance (held-out ROC AUC >= {yield_model.gate.min_auc:g}): "
                  f"{'passed' if yield_model.gate.passed else 'NOT passed'}; {yield_model.gate.reason}."]
    return lines + [""] if lines else []


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"
