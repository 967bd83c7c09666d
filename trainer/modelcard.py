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
        f"({lineage.train_rows:,} for training the outlier model, {lineage.holdout_rows:,} held out of it at random"
        + ("; the yield model is judged on forward folds, below)." if manifest.held_out is not None else ")."),
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
        *_forward_section(manifest.metrics.yield_model),
        "## How well it does",
        "",
        "| measure | value | parts behind it (failing) | measured on |",
        "|---|---|---|---|",
    ]
    om, ym = manifest.metrics.outlier, manifest.metrics.yield_model
    outlier_on = f"{om.get('holdout_parts', 0):,} random held-out parts"
    yield_on, parts = ym.get("split", "held-out parts"), f"{ym.get('evaluated_parts', 0):,} ({ym.get('fail_parts', 0):,})"
    rows = [
        ("outlier rate, passing parts", _pct(om.get("holdout_outlier_rate_passing")), "", outlier_on),
        ("outlier rate, failing parts", _pct(om.get("holdout_outlier_rate_failing")), "", outlier_on),
        ("latent-outlier recall (synthetic ground truth)", _pct(om.get("latent_outlier_recall")),
         f"{om.get('latent_outlier_parts', 0):,}", outlier_on),
        ("yield ROC AUC, 95% interval", _interval(ym.get("roc_auc"), ym.get("roc_auc_low"), ym.get("roc_auc_high")),
         parts, yield_on),
        ("yield fail precision at the threshold", _counted(ym.get("caught_fails"), ym.get("flagged_parts"), "flagged"),
         parts, yield_on + ", where the threshold was chosen"),
        ("yield fail recall at the threshold", _counted(ym.get("caught_fails"), ym.get("fail_parts"), "failing"),
         parts, yield_on + ", where the threshold was chosen"),
        ("yield Brier score", _num(ym.get("brier")), parts, yield_on),
    ]
    lines += [f"| {name} | {value} | {behind} | {on} |" for name, value, behind, on in rows if value != "n/a"]
    lines += ["", "## Calibration of the pass probability (forward folds, out of time)", "",
              "| predicted | parts | mean predicted | observed pass rate |", "|---|---|---|---|"]
    lines += [f"| {c['bin']} | {c['parts']} | {_num(c['mean_predicted'])} | {_num(c['observed_pass_rate'])} |"
              for c in ym.get("calibration", []) if c["parts"]]
    lines += _static_pat(manifest)
    lines += _pat_floors(manifest)
    lines += _pat_screens(manifest)
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
    lines += [f"A test whose robust sigma differs between training lots takes its widest lot's (its floor and the "
              "room left for the next lot: below). Self-check: a test whose limits flag more than "
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


def _pat_floors(manifest: Manifest) -> list[str]:
    """Which floor set each test's sigma (static and dynamic) and the room its static limits leave for the next lot."""
    pat, limited = manifest.pat, [limit for limit in manifest.pat.limits if limit.sigma_floor is not None]
    if not limited:
        return []   # a package written before the floors
    binding = [limit for limit in limited if limit.sigma_floor and limit.robust_sigma is not None
               and limit.robust_sigma <= limit.sigma_floor * (1 + 1e-9)]
    by_limits = [limit for limit in binding if limit.resolution is None
                 or limit.sigma_floor > pat.resolution_floor * limit.resolution * (1 + 1e-9)]
    rules = Counter(limit.allowance_rule for limit in limited if limit.allowance_rule)
    lines = ["", "## PAT floors and the next lot", "",
             f"No sigma, static or in a dynamic site window, is below the test's floor: {pat.resolution_floor:g} "
             f"resolution step (read site by site) or {pat.limit_share_floor:.0%} of its limit range, whichever is "
             f"larger. The floor sets the sigma of {len(binding)} of {len(limited)} tests ({len(by_limits)} by the "
             "limit range, the others by the resolution); the data sets the rest.",
             "Static limits leave room for the next lot on top of k robust sigmas: "
             + "; ".join(f"{rule} ({count} tests)" for rule, count in rules.most_common()) + "."]
    if binding:
        lines += ["", "| test | resolution | sigma floor | robust sigma | lot allowance (sigma) |", "|---|---|---|---|---|"]
        lines += [f"| {limit.column} | {_num(limit.resolution)} | {_num(limit.sigma_floor)} | "
                  f"{_num(limit.robust_sigma)} | {_num(limit.lot_allowance)} |" for limit in binding[:MAX_PAT_ROWS]]
        if len(binding) > MAX_PAT_ROWS:
            lines += ["", f"... and {len(binding) - MAX_PAT_ROWS} more in manifest.pat.limits"]
    return lines


def _pat_screens(manifest: Manifest) -> list[str]:
    """Each PAT screen on later training parts: good and failing parts flagged, and whether it separates them."""
    screens = manifest.pat.screens
    if screens is None:
        return []
    lines = ["", "## PAT screens on later parts", "",
             f"Limits set on earlier training parts and judged on later ones ({manifest.pat.screens_cut}), good "
             "and failing by the tester's pass flag, with 95 % intervals. A screen that does not separate them is "
             "reported by the agent and never decides a bin.", "",
             "| screen | good flagged | failing flagged | verdict |", "|---|---|---|---|"]
    for screen in screens:
        lines.append(f"| {screen.kind} | {_share(screen.good_flagged, screen.good_parts, screen.good_rate_interval)} | "
                     f"{_share(screen.fail_flagged, screen.fail_parts, screen.fail_rate_interval)} | "
                     f"**{screen.verdict}**: {screen.reason} |")
    return lines


def _share(flagged: int, parts: int, interval: list[float]) -> str:
    rate = flagged / parts if parts else 0.0
    return f"{rate:.2%} ({flagged} of {parts}; {interval[0]:.2%}-{interval[1]:.2%})"


def _gate_warning(yield_model) -> list[str]:
    gate = yield_model.gate
    if gate is None or gate.passed:
        return []
    return [f"> **ADVISORY: {gate.reason}.** It was published only as advisory (`--advisory`): agents mark its "
            "pass probability as advisory in every reply, and the registry refuses to promote it to staging or "
            "production unless forced with a reason (`--force`), which the history records.", ""]


def _forward_section(metrics: dict) -> list[str]:
    """The experiment comparison: every candidate's forward ROC AUC per fold beside the failing parts behind it."""
    forward = metrics.get("forward")
    if not forward:
        return []
    folds = forward["folds"]
    header = " | ".join(f"fold {i}: {f['test_parts']:,} parts ({f['test_fails']} failing), trained on "
                        f"{f['train_parts']:,}" for i, f in enumerate(folds, 1))
    lines = ["## Model choice on forward folds", "",
             "Each fold trains every candidate only on the parts before its block and scores the block. The best "
             "mean forward ROC AUC is refit on every part and shipped. Pooled: all blocks' out-of-time predictions "
             "together, with a 95% bootstrap interval.", "",
             f"| candidate | {header} | mean | pooled (95% interval) |",
             "|---|" + "---|" * len(folds) + "---|---|"]
    for c in forward["candidates"]:
        cells = " | ".join(_num(a) for a in c["fold_auc"])
        lines.append(f"| {c['name']} ({c['what']}) | {cells} | {_num(c['mean_auc'])} | "
                     f"{_interval(c['pooled_auc'], c['pooled_low'], c['pooled_high'])} |")
    fails = sum(f["test_fails"] for f in folds)
    lines += ["", f"- Chosen: {forward['choice']}.",
              f"- Failing parts behind the pooled figures: {fails:,} of {sum(f['test_parts'] for f in folds):,}."]
    screened = forward["screened"][-1] if forward["screened"] else None
    if screened:
        lines.append(f"- Signals screened out on the last fold's training parts: {screened['mostly_missing']} "
                     f"mostly missing, {screened['constant']} constant, {screened['duplicated']} duplicated.")
    if forward.get("sampled"):
        lines.append(f"- Row cap: {forward['sampled']}.")
    return lines + [""]


def _interval(point, low, high) -> str:
    return "n/a" if point is None else f"{point:.3f} ({low:.3f}-{high:.3f})"


def _counted(numerator, denominator, what: str) -> str:
    if not denominator:
        return "n/a"
    return f"{numerator / denominator:.1%} ({numerator:,} of {denominator:,} {what})"


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
        lines += [f"- Threshold {yield_model.threshold:.4g} chosen for `{choice.objective}` on the "
                  f"{choice.tuning_parts:,} pooled forward predictions: {choice.note}. Its precision and recall "
                  "below are on those same predictions (optimistic by that choice)."]
    if yield_model.gate is not None:
        lines += [f"- Against chance (the forward AUC interval's lower bound >= {yield_model.gate.min_auc:g}): "
                  f"{'passed' if yield_model.gate.passed else 'NOT passed'}; {yield_model.gate.reason}."]
    return lines + [""] if lines else []


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"
