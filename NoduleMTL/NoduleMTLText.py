"""Text of the NoduleMTL panel (HTML summary, status line, RAS parsing): plain Python.

Slicer-side presentation, kept out of ``NoduleMTLLib`` (which knows nothing of the panel)
and out of ``NoduleMTL.py`` (so plain pytest can test it without Slicer: no slicer, qt or
vtk import here).  Input: an :class:`NoduleMTLLib.core.results.AnalysisResult` or its
``to_dict()`` (``nodules.json``).
"""

import html
import json
import math
import re

from NoduleMTLLib.outputs.fields import detection_phrase, summary_line

#: Shown under every summary.
DISCLAIMER = "Research use only: not for clinical diagnosis."

#: Tooltip of the Find nodules threshold box when the weights' manifest gives no operating points.
THRESHOLD_TOOLTIP_FALLBACK = ("Minimum score of Find nodules (0 = default: the operating point of the two-stage search, "
                              "detector + false-positive reduction). Lower values list more candidates (more false marks); "
                              "higher values give shorter lists but miss small nodules. See the fpr25d and maskrcnn25d model cards.")


def detection_threshold_tooltip(manifest_path) -> str:
    """Tooltip of the Find nodules threshold box, quoting the shipped operating points from the
    weights' manifest (``Resources/Weights/models.json``, entry ``fpr25d``: ``operating_threshold``
    and ``high_sensitivity_threshold``, the values the analysis uses); without them
    :data:`THRESHOLD_TOOLTIP_FALLBACK` (no figures rather than stale ones)."""
    try:
        with open(manifest_path, encoding="utf-8") as f:
            entry = json.load(f)["networks"]["fpr25d"]
        default, high = float(entry["operating_threshold"]), float(entry["high_sensitivity_threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        return THRESHOLD_TOOLTIP_FALLBACK
    return (f"Minimum score of Find nodules (0 = default: {default:.4f}, the operating point of the two-stage search - "
            "detector + false-positive reduction - chosen on six non-test scans for at most 2 false positives per scan). "
            f"{high:.4f} = high sensitivity (at most 8 false positives per scan on those scans; see the fpr25d model card "
            "for what it finds on the test scans). Lower values list more candidates (more false marks); higher values "
            "give shorter lists but miss small nodules. See the fpr25d and maskrcnn25d model cards.")


def _pct(p) -> str:
    return "n/a" if p is None else f"{100.0 * float(p):.0f}%"


def _result_dict(result) -> dict:
    return result if isinstance(result, dict) else result.to_dict()


def _scalar_text(key: str, value) -> str | None:
    if isinstance(value, bool) or value is None:
        return None if value is None else f"{key} {'yes' if value else 'no'}"
    if isinstance(value, (int, float)):
        if "probability" in key and "spread" not in key and "std" not in key:
            return f"{key.replace('_', ' ')} {_pct(value)}"
        return f"{key.replace('_', ' ')} {value:.2f}" if isinstance(value, float) else f"{key.replace('_', ' ')} {value}"
    if isinstance(value, str):
        return f"{key.replace('_', ' ')} {html.escape(value)}"
    return None


def consensus_text(consensus: dict | None) -> str:
    """One line for a nodule's ``consensus`` record (whatever keys it holds): the mean
    malignancy probability first, then the disagreement level and spread, then the other
    scalar figures; "" when there is nothing to show (None, or a single network)."""
    if not consensus:
        return ""
    if (consensus.get("n_networks") or 0) < 2 and (consensus.get("n_found") or 0) < 2:
        return ""
    parts = []
    if consensus.get("malignancy_probability") is not None:
        parts.append(f"P(malignant) {_pct(consensus['malignancy_probability'])}")
    if consensus.get("disagreement"):
        parts.append(f"disagreement <b>{html.escape(str(consensus['disagreement']))}</b>")
    shown = {"malignancy_probability", "disagreement", "mask_rule", "mask_voxels"}
    for key in ("probability_spread", "dice_pairwise_min", "n_found", "n_networks"):
        if key in consensus and (text := _scalar_text(key, consensus[key])):
            parts.append(text)
            shown.add(key)
    for key, value in consensus.items():
        if key not in shown and (text := _scalar_text(key, value)):
            parts.append(text)
    reasons = consensus.get("reasons") or []
    if reasons:
        parts.append("(" + html.escape("; ".join(str(r) for r in reasons)) + ")")
    return "consensus: " + ", ".join(parts) if parts else ""


def summary_html(result, disclaimer: str = DISCLAIMER) -> str:
    """The panel's summary (HTML): the run's notes (``messages``), then per nodule the summary
    fields of the one field list (:data:`NoduleMTLLib.outputs.fields.REPORTED_FIELDS`: size, type, the
    reported P(malignant), Lung-RADS, Brock; and the detection score), per network its raw
    output and sign probabilities (labelled raw network output), and the consensus line when present.

    Args:
        result: an ``AnalysisResult`` or its ``to_dict()`` (``nodules.json``).
    """
    lines = []
    d = _result_dict(result)
    for message in d.get("messages") or []:
        lines.append(f"<i>{html.escape(str(message))}</i>")
    for n in d.get("nodules", []):
        name = html.escape(str(n.get("name") or f"Nodule {n.get('id')}"))
        if not n.get("found"):
            lines.append(f"<b>{name}</b>: no nodule found at the point. {html.escape(n.get('message') or '')}".strip())
            continue
        found_by = detection_phrase(n.get("detection"))
        score = f", {html.escape(found_by)}" if found_by else ""
        lines.append(f"<b>{name}</b>: {html.escape(summary_line(n) or 'size n/a')}{score}")
        for nid, out in (n.get("networks") or {}).items():
            out = out or {}
            text = f"&nbsp;&nbsp;raw network output {html.escape(nid)}: P(malignant) {_pct(out.get('malignancy_probability'))}"
            signs = out.get("sign_probabilities") or {}
            if signs:
                text += " &middot; " + ", ".join(f"{html.escape(k)} {_pct(v)}" for k, v in signs.items())
            lines.append(text)
        cons = consensus_text(n.get("consensus"))
        if cons:
            lines.append("&nbsp;&nbsp;" + cons)
        if n.get("message"):
            lines.append(f"&nbsp;&nbsp;<i>{html.escape(n['message'])}</i>")
    if disclaimer:
        lines.append(f"<i>{html.escape(disclaimer)}</i>")
    return "<br>".join(lines)


def status_text(result, seconds: float | None = None) -> str:
    """"Done: N of M nodule(s) segmented on <device> in <t> s (...)", with the CPU
    fallback note when the run fell back from the GPU."""
    d = _result_dict(result)
    run = d.get("run") or {}
    nodules = d.get("nodules") or []
    found = sum(1 for n in nodules if n.get("found"))
    timing = run.get("timing_s") or {}
    total = seconds if seconds is not None else timing.get("total")
    text = f"Done: {found} of {len(nodules)} nodule(s) segmented"
    if run.get("device"):
        text += f" on {run['device']}"
    if total is not None:
        text += f" in {float(total):.1f} s"
        if seconds is not None and timing.get("total") is not None:
            text += f" (analysis {float(timing['total']):.1f} s"
            text += f", weights {float(timing['load']):.1f} s)" if timing.get("load") is not None else ")"
    if run.get("fallback"):
        text += f". {run['fallback']}"
    return text


def parse_ras_text(text: str) -> tuple[float, float, float]:
    """``"R, A, S"`` (the table's ``point_ras_mm`` text, or space separated) -> floats.

    Raises:
        ValueError: not three finite numbers.
    """
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"Not a RAS point: {text!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"Not a RAS point: {text!r}")
    return values
