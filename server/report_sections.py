"""HTML sections of the run report: the verdict table and the per-aspect metric tables.

Each ``*_html(metrics)`` builder returns the body of one report section as an HTML fragment, reads
only its own block of ``metrics`` (layout in :mod:`server.report`) and returns
:data:`NOT_MEASURED` when that block is missing, so a partial run still renders. Every value from
``metrics`` goes through :func:`html.escape` (or is formatted as a number) before it is written.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from server.report_figures import UTILITY_ARMS, png_bytes
from server.report_verdicts import THRESHOLDS, final_epsilons, verdicts
from server.run_metrics import AuditSummary, PrivacyBlock, Reconstruction

__all__ = [
    "NOT_MEASURED",
    "fidelity_html",
    "img_tag",
    "method_html",
    "privacy_html",
    "run_html",
    "utility_html",
    "verdict_html",
]


def img_tag(name: str, fig: Any) -> str:
    """A ``<figure>`` with the PNG inlined as a data URI (no external file) and a caption."""
    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    cap = html.escape(name.replace("_", " "))
    return (
        f'<figure><img alt="{cap}" src="data:image/png;base64,{data}">'
        f"<figcaption>{cap}</figcaption></figure>"
    )


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{_fmt(v[0])}, {_fmt(v[1])}]"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_fmt(c)}</td>'
            if isinstance(c, (int, float))
            else f"<td>{_fmt(c)}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


NOT_MEASURED = '<p class="muted">Not measured in this run.</p>'


def acceptance_html(m: Mapping[str, Any]) -> str:
    """GO / NO-GO against the criteria declared before the run (or the default thresholds),
    criterion by criterion with the measured value, its interval and the rule that decided."""
    acc = m.get("acceptance")
    if not isinstance(acc, Mapping):
        return ""
    go = bool(acc.get("go"))
    badge = f'<span class="badge {"PASS" if go else "FAIL"}">{"GO" if go else "NO-GO"}</span>'
    if not acc.get("declared"):
        failed = ", ".join(str(a) for a in acc.get("failed") or [])
        return (f"<p><b>Go / no-go:</b> {badge} against the default thresholds below: no "
                "acceptance criteria were declared for this run (<code>--accept</code>)."
                + (f" Failing: {html.escape(failed)}." if failed else "") + "</p>")

    def interval(ci: Any) -> str:
        if not isinstance(ci, (list, tuple)) or ci[0] is None:
            return "-"
        return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"

    rows = [(r.get("criterion"), "-" if r.get("value") is None else _fmt(r.get("value")),
             interval(r.get("ci")), r.get("rule"), "met" if r.get("met") else "NOT met")
            for r in acc.get("criteria") or [] if isinstance(r, Mapping)]
    return (f"<p><b>Go / no-go:</b> {badge} against the acceptance criteria declared before "
            f"training (<code>{html.escape(str(acc.get('spec', '')))}</code>). "
            f"{html.escape(str(acc.get('rule', '')))}.</p>"
            + _table(["criterion", "measured", "95% CI", "decided by", "outcome"], rows))


def verdict_html(m: Mapping[str, Any]) -> str:
    """The go/no-go line, then the verdict table: one row per aspect with its PASS/WEAK/FAIL
    badge and sentence."""
    return acceptance_html(m) + (
        "<table><tr><th>aspect</th><th>status</th><th>what it means</th></tr>"
        + "".join(
            f"<tr><td><b>{html.escape(aspect)}</b></td>"
            f'<td><span class="badge {status}">{status}</span></td>'
            f"<td>{html.escape(sentence)}</td></tr>"
            for aspect, status, sentence in verdicts(m)
        )
        + "</table>"
    )


def run_html(m: Mapping[str, Any]) -> str:
    run = m.get("run")
    out = _table(["setting", "value"], [(k, v) for k, v in run.items()]) if run else NOT_MEASURED
    return out + _rejections_html(m.get("errors"))


MAX_LISTED = 50  # rows of rejected replies or flags shown; the rest are counted


def _rejections_html(errors: Any) -> str:
    """Replies the coordinator refused (malformed, out of range, a claimed identity, a poisoned
    update): one row each, so a hostile or broken site is visible to whoever reads the report."""
    if not isinstance(errors, list) or not errors:
        return ""
    rows = [(e.get("stage", "?"), e.get("node", "?"), e.get("reason", "?"))
            for e in errors[:MAX_LISTED] if isinstance(e, dict)]
    more = (f'<p class="muted">... and {len(errors) - MAX_LISTED} more (metrics.json '
            '"errors").</p>') if len(errors) > MAX_LISTED else ""
    return (f'<h3>Replies the coordinator rejected ({len(errors)})</h3>'
            '<p>Each was left out of its round; see run.log for when it happened.</p>'
            + _table(["stage", "node", "reason"], rows) + more)


def reconstruction_html(m: Mapping[str, Any]) -> str:
    """The autoencoder on each site's unseen holdout patients: the ceiling on what the
    generator can draw, shown before the synthetic-set measures it explains."""
    rec = Reconstruction.from_json(m.get("reconstruction"))
    if rec is None:
        return ""

    def pm(v: Any, se: Any, fmt: str) -> str:
        if v is None:
            return "swamped by DP noise"
        return format(v, fmt) + ("" if se is None else f" ± {format(se, fmt)}")

    rows = [("all sites (pooled)", pm(rec.psnr_db, rec.psnr_se_db, ".1f"),
             pm(rec.ssim, rec.ssim_se, ".3f"), _fmt(rec.patients))]
    rows += [(site, pm(v.get("psnr_db"), v.get("psnr_se_db"), ".1f"),
              pm(v.get("ssim"), v.get("ssim_se"), ".3f"), _fmt(v.get("patients")))
             for site, v in sorted(rec.sites.items())]
    return ("<h3>Autoencoder reconstruction (sites' holdout patients, DP)</h3>"
            "<p>How well the shared autoencoder reproduces real images it never trained on: "
            "generated images cannot be sharper than this. Each site releases its patients' mean "
            "PSNR and SSIM through a Gaussian mechanism charged to its ledger; &plusmn; is the "
            "standard error from that noise.</p>"
            + _table(["sites", "PSNR dB", "SSIM", "holdout patients (noisy)"], rows))


def fidelity_html(m: Mapping[str, Any]) -> str:
    fid_block = m.get("fidelity")
    if not fid_block:
        return reconstruction_html(m) or NOT_MEASURED
    keys = ["fid", "kid", "kid_std", "precision", "recall", "density", "coverage"]
    rows = []
    for space, block in fid_block.items():
        if space == "diversity" or not isinstance(block, Mapping):
            continue
        rows.append([f"{space}: real vs synthetic"] + [block.get(k, float("nan")) for k in keys])
        ref = block.get("real_split")
        if ref:
            rows.append(
                [f"{space}: real half vs real half"] + [ref.get(k, float("nan")) for k in keys]
            )
    out = reconstruction_html(m) + (
        "<p>FID/KID: lower is closer (0 = same distribution). Precision: share of synthetic images "
        "that look like some real image. Recall and coverage: share of the real variety the "
        "synthetic set reproduces. Density is about 1 when both sets match. The 'real half' rows "
        "show what a perfect generator would score.</p>" + _table(["feature space"] + keys, rows)
    )
    div = fid_block.get("diversity")
    if div:
        classes = sorted(set(div.get("real", {})) | set(div.get("synthetic", {})), key=str)
        out += "<h3>Within-class similarity (mean pairwise SSIM, lower = more diverse)</h3>"
        out += _table(
            ["class", "real", "synthetic"],
            [
                (
                    c,
                    div.get("real", {}).get(c, float("nan")),
                    div.get("synthetic", {}).get(c, float("nan")),
                )
                for c in classes
            ],
        )
    return out


def utility_html(m: Mapping[str, Any]) -> str:
    u = m.get("utility")
    if not u:
        return NOT_MEASURED
    rows = [
        (
            label,
            u.get(f"{a}_auc", float("nan")),
            u.get(f"{a}_auc_ci", ""),
            u.get(f"{a}_acc", float("nan")),
            u.get(f"{a}_acc_ci", ""),
        )
        for a, label in UTILITY_ARMS
        if f"{a}_auc" in u
    ]
    if u.get("measured_at") == "sites":
        missing = u.get("sites_missing") or []
        intro = (
            "<p>Measured at the sites, on their own test patients: the coordinator trained the "
            "small CNN on the synthetic set (TSTR) and sent it to the sites; TRTR is "
            f"{html.escape(str(u.get('trtr_kind', '')))}, so the ratio compares against a "
            "DP-trained baseline, not the non-private one a simulation uses. Each site released "
            "one vector of noisy counts (per-patient score histograms and confusion matrices); "
            "AUC, accuracy and recall come from the pooled counts. The 95% intervals are those "
            f"of the DP noise only (pooled noise std {float(u.get('noise_std') or 0):.2f} per "
            "count), not of the test set's sampling. Sites: "
            f"{html.escape(', '.join(u.get('sites') or []))}"
            + (f"; missing: {html.escape('; '.join(map(str, missing)))}" if missing else "")
            + ".</p>")
    else:
        intro = (
            "<p>The same small CNN, trained with the same recipe on real images (TRTR), on "
            "synthetic images matched to the real class counts (TSTR) and on both (TRS), scored "
            "on real test patients. Values are those of the seed ensemble (probabilities "
            "averaged over the seeds' models); 95% intervals come from resampling test "
            "patients.</p>")
    out = intro + _table(["training data", "macro AUC", "AUC 95% CI", "accuracy",
                          "accuracy 95% CI"], rows)
    out += _table(
        ["TSTR/TRTR ratio", "95% CI", "train images", "synthetic images", "test images", "seeds"],
        [
            (
                u.get("ratio", float("nan")),
                u.get("ratio_ci", ""),
                u.get("n_train", ""),
                u.get("n_synthetic", ""),
                u.get("n_test", ""),
                str(u.get("seeds", "")),
            )
        ],
    )
    per_class = u.get("per_class")
    if per_class:
        n = max(len(v) for v in per_class.values())
        out += "<h3>One-vs-rest AUC per class</h3>" + _table(
            ["class"] + [lbl for a, lbl in UTILITY_ARMS if a in per_class],
            [[c] + [per_class[a][c] for a, _ in UTILITY_ARMS if a in per_class] for c in range(n)],
        )
    return out + segmentation_html(u.get("segmentation"))


def segmentation_html(seg: Mapping[str, Any] | None) -> str:
    """Dice TSTR/TRTR of paired runs (ldm_core.evaluation.segmentation); empty otherwise."""
    if not seg:
        return ""
    head = "<h3>Segmentation (paired image/mask generation)</h3>"
    if "not_measured" in seg:
        return head + f'<p class="muted">Not measured: {html.escape(str(seg["not_measured"]))}'\
            "</p>"
    intro = (
        "<p>A small MONAI UNet, trained with one recipe on real image/mask pairs (TRTR) and on "
        "the synthetic pairs (TSTR), outlines lesions on the real test patients. Dice is pooled "
        "per patient over their slices and averaged over the patients with a lesion; 'Dice, "
        "all patients' also scores lesion-free patients (1 if nothing is predicted, else 0). "
        "Alignment: the TRTR segmenter's Dice against the synthetic masks on the synthetic "
        "images (does a generated mask outline the lesion in its own image?). 95% intervals "
        f"come from resampling test patients. Judge: {html.escape(str(seg.get('judge', '')))}."
        "</p>")
    rows = [(label, seg.get(f"{a}_dice", float("nan")), seg.get(f"{a}_dice_ci", ""),
             seg.get(f"{a}_dice_all", float("nan")), seg.get(f"{a}_dice_all_ci", ""))
            for a, label in (("trtr", "real (TRTR)"), ("tstr", "synthetic (TSTR)"))]
    out = head + intro + _table(["training pairs", "Dice", "Dice 95% CI", "Dice, all patients",
                          "95% CI"], rows)
    alignment = seg.get("alignment_dice")
    return out + _table(
        ["TSTR/TRTR Dice ratio", "95% CI", "alignment Dice", "test patients (with lesion)",
         "seeds"],
        [(seg.get("ratio", float("nan")), seg.get("ratio_ci", ""),
          float("nan") if alignment is None else alignment,
          f"{seg.get('n_test_patients', '')} ({seg.get('n_lesion_patients', '')})",
          str(seg.get("seeds", "")))])


def privacy_html(m: Mapping[str, Any]) -> str:
    out = "<h3>Formal guarantee (differential privacy)</h3>"
    priv = m.get("privacy") or {}
    block = PrivacyBlock.from_json(priv)
    if str(block.randomness or "").startswith("SEEDED"):
        out += ('<p class="badge FAIL">NOT private against anyone who knows the seed: the '
                "sites' privacy randomness was seeded (reproducible mode).</p>")
    if block.unit:
        out += f"<p>Unit of privacy: {html.escape(str(block.unit))}.</p>"
    sites = final_epsilons(priv)
    if sites:
        out += _table(
            ["site", "epsilon spent", "delta", "epsilon budget"],
            [(s, _nan(v.epsilon), _nan(v.delta), _nan(v.budget_epsilon))
             for s, v in sites.items()],
        )
    else:
        out += NOT_MEASURED
    flagged = [(s, f) for s, v in sites.items() for f in v.flags]
    if flagged:
        out += ('<p class="badge FAIL">Privacy figures refused as impossible (not believed, not '
                "used for the table above):</p>"
                + _table(["site", "why"], flagged[:MAX_LISTED]))
    disclosures = block.disclosures
    out += "<h3>Other values released from private data</h3>"
    if disclosures:
        out += "<ul>" + "".join(f"<li>{html.escape(str(d))}</li>" for d in disclosures) + "</ul>"
    else:
        out += '<p class="muted">None declared.</p>'
    out += _audit_html(block.audit)
    return out


def _nan(x: float | None) -> float:
    """A value the run did not report shows as n/a."""
    return float("nan") if x is None else x


def _audit_html(audit: AuditSummary) -> str:
    """The DP audit tables: one row per site and attack, every value with its noise std."""
    sites = audit.audit_sites
    out = "<h3>Membership inference (DP release from each site)</h3>"
    if not sites:
        return out + NOT_MEASURED + "<h3>Near copies of training images</h3>" + NOT_MEASURED
    noise = _nan(audit.mia_noise_std)
    out += (
        "<p>Each site attacked the final model on its own records (training images = members, "
        "holdout images = non-members) and released a few counts once, with Gaussian noise "
        "(differential privacy, charged to its ledger). The values below carry that noise: its "
        f"standard deviation is {_fmt(noise)} per released fraction at the noisiest site (larger "
        "after renormalising a split smaller than the site's audit size). The threshold of each "
        "attack is set on samples the site generated itself (1% of them score below it), so the "
        "FPR column says how many unseen images it flags; TPR &gt; FPR means the attack finds "
        "training images. Attack results are <b>lower bounds</b> on leakage: they show what "
        "these attacks found, never that no attack can succeed.</p>"
    )
    rows = []
    for site, s in sites.items():
        for attack, v in s.attacks.items():
            rows.append((site, attack + (" (best)" if attack == s.best_attack else ""),
                         v.get("auc", float("nan")), v.get("tpr", float("nan")),
                         v.get("fpr", float("nan")), s.noise_std,
                         s.records if s.records is not None else ""))
    out += _table(["site", "attack", "AUC (DP)", "TPR at threshold (DP)",
                   "FPR at threshold (DP)", "noise std", "records per split (m)"], rows)
    out += _table(
        ["mean over sites", "AUC (best attack)", "TPR", "FPR", "noise std per site"],
        [("all sites", _nan(audit.mia_auc), _nan(audit.mia_tpr_at_1pct_fpr),
          _nan(audit.mia_fpr_at_threshold), noise)],
    )
    out += "<h3>Near copies of training images</h3>"
    out += (
        "<p>A record counts as near-copied when its nearest generated sample (random-CNN feature "
        "space) is three times closer than the second nearest. The holdout column is the same "
        "test on unseen images: what chance gives. A training fraction at or below it means "
        "this test found no copies; that reflects low fidelity as much as privacy (a generator "
        "whose samples resemble no real image copies none), and a record the model reproduces "
        "several times escapes this test.</p>"
    )
    out += _table(
        ["site", "training images (DP)", "holdout images, chance (DP)", "noise std"],
        [(site, s.near_copy_fraction, s.near_copy_fraction_holdout, s.noise_std)
         for site, s in sites.items()],
    )
    return out


def method_html() -> str:
    t = THRESHOLDS
    items = [
        f"Utility: PASS when TSTR/TRTR AUC ratio &ge; {t['utility_ratio_pass']}, FAIL below "
        f"{t['utility_ratio_fail']}.",
        f"Fidelity: precision/recall relative to the real-half baseline; PASS when &ge; "
        f"{t['fidelity_rel_precision_pass']} / {t['fidelity_rel_recall_pass']}, FAIL below "
        f"{t['fidelity_rel_precision_fail']} / {t['fidelity_rel_recall_fail']} (absolute "
        f"{t['fidelity_abs_precision_pass']} / {t['fidelity_abs_recall_pass']} and "
        f"{t['fidelity_abs_precision_fail']} / {t['fidelity_abs_recall_fail']} without a "
        "baseline). "
        "Feature spaces are a seeded random CNN and our own classifier (no downloaded Inception "
        "network), so values are comparable only between runs using the same extractor.",
        f"Autoencoder: PASS when the 95% interval (DP noise) of the shared autoencoder's SSIM "
        f"on the sites' holdout patients lies at or above {t['autoencoder_ssim_pass']}, FAIL "
        f"when it lies below {t['autoencoder_ssim_fail']}, WEAK otherwise.",
        f"Diversity: WEAK when synthetic within-class SSIM exceeds the real one by "
        f"{t['diversity_gap_weak']}, FAIL by {t['diversity_gap_fail']}.",
        "Formal privacy: PASS when every site's cumulative epsilon (all rounds, both phases) is "
        "within its budget; FAIL when a site exceeded it or trained without DP.",
        f"Membership inference: PASS at AUC &le; {t['mia_auc_pass']}, FAIL above "
        f"{t['mia_auc_fail']} (mean over sites of the best attack's DP value); WEAK instead of "
        f"PASS when the DP noise on that mean exceeds {t['mia_noise_weak']}. Attack results are "
        "lower bounds on leakage; the DP epsilon is the guarantee.",
        "Memorisation: near-copy fraction of training images minus that of unseen images "
        f"(chance); WEAK above max(2 noise SE, {t['near_copy_weak_excess']}), FAIL above max(4 "
        f"noise SE, {t['near_copy_fail_excess']}). At or below chance is explained, not "
        "celebrated: it reflects low fidelity as much as privacy.",
        "A measurement that is missing counts as FAIL.",
    ]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"
