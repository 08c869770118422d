"""``report.html``: a self-contained page of one analysis (no external file, script or font).

Content: the disclaimer "research software, not for clinical use"; the per-scan Lung-RADS
category; the results table (one row per nodule: position, the reported fields of
:data:`NoduleMTLLib.outputs.fields.REPORTED_FIELDS` - measurements, the reported P(malignant),
Lung-RADS, Brock - then the networks' raw outputs labelled as such, the Brock status);
each nodule's picture (:mod:`NoduleMTLLib.outputs.pictures`, embedded as a base64 PNG) with its
notes; the Brock inputs and where each came from; the run's settings (input, networks,
device, version, timings) and the sources of the rules and models.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .. import __version__
from ..core.filenames import REPORT_FILE  # noqa: F401
from .fields import REPORTED_FIELDS, raw_network_fields

DISCLAIMER = "Research software, not for clinical use."

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#111;max-width:1200px}
.disclaimer{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;font-weight:bold}
table{border-collapse:collapse;margin:12px 0;font-size:13px}
th,td{border:1px solid #bbb;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#eee}
.cat{font-weight:bold;font-size:1.2em}
img{max-width:100%;border:1px solid #444}
.small{font-size:12px;color:#444}
"""


def _e(v) -> str:
    return html.escape("" if v is None else str(v))


def report_html(result, pictures_dir=None, title: str | None = None) -> str:
    """The page as a string.

    Args:
        result: :class:`NoduleMTLLib.core.results.AnalysisResult` (with ``lung_rads`` / ``brock``
            records when :func:`NoduleMTLLib.service.assessment.annotate_result` ran).
        pictures_dir: folder holding ``nodule_<id>.png`` (embedded when present); None: no pictures.
    """
    from .pictures import key_figures, picture_file

    run = result.run or {}
    nets = list(run.get("networks", []) or [])
    src = (result.input or {}).get("path", "")
    title = title or f"NoduleMTL report: {Path(str(src)).name or 'CT'}"
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>",
           f"<p class='disclaimer'>{_e(DISCLAIMER)} NoduleMTL {_e(__version__)} is not a medical device; its "
           "outlines, categories and probabilities must be checked by a radiologist.</p>"]
    scan = run.get("lung_rads")
    if scan:
        out.append(f"<p>Lung-RADS (per scan, highest of the analysed nodules): <span class='cat'>{_e(scan['category'])}</span>"
                   f" (nodule {', '.join(str(i) for i in scan['nodule_ids'])}). <span class='small'>{_e(scan['version'])}; "
                   "no comparison with prior scans.</span></p>")
    else:
        out.append("<p>Lung-RADS: no nodule assessed.</p>")
    fields = list(REPORTED_FIELDS) + raw_network_fields(nets)  # the one field list; raw outputs last, labelled
    head = ["Nodule", "RAS point (mm)"] + [f.heading for f in fields] + ["Brock inputs", "Note"]
    out.append("<h2>Results</h2><table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for n in result.nodules:
        lr, br = getattr(n, "lung_rads", None) or {}, getattr(n, "brock", None) or {}
        if br.get("probability") is not None:
            btxt = "lower bound: " + ", ".join(br["assumed"]) + " assumed" if br.get("lower_bound") else "complete"
        elif br:
            btxt = "incomplete: " + ", ".join(br.get("missing", [])) + " unknown"
        else:
            btxt = ""
        d = n.to_dict()
        cells = [n.name, " ".join(f"{v:.1f}" for v in n.point_ras_mm)] + [f.text(d, unit=False) for f in fields]
        cells += [btxt, n.message if not n.found else "; ".join(lr.get("suggestions", []) + lr.get("notes", []))]
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    out.append("<p class='small'>Brock risk: McWilliams et al., N Engl J Med 2013 (PanCan full model with spiculation), "
               "a different model from the networks' P(malignant). Lung-RADS: ACR Lung-RADS v2022, baseline rules only "
               "(no prior-scan comparison); nodule type from HU composition; 4X is never assigned, only suggested.</p>")
    for n in result.nodules:
        if not n.found:
            continue
        out.append(f"<h2>{_e(n.name)}</h2>")
        pic = Path(pictures_dir) / picture_file(n.id) if pictures_dir else None
        if pic is not None and pic.is_file():
            b64 = base64.b64encode(pic.read_bytes()).decode("ascii")
            out.append(f"<img alt='{_e(n.name)}: axial, coronal, sagittal' src='data:image/png;base64,{b64}'>")
        out.append("<p>" + "<br>".join(_e(s) for s in key_figures(n)) + "</p>")
        br = getattr(n, "brock", None)
        if br:
            rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(br['inputs'].get(k))}</td><td>{_e(br['sources'].get(k, ''))}</td></tr>"
                           for k in br["inputs"])
            out.append("<details><summary>Brock inputs</summary><table><tr><th>input</th><th>value</th><th>source</th></tr>"
                       f"{rows}</table><p class='small'>{_e('; '.join(br.get('notes', [])))}</p></details>")
    settings = {k: v for k, v in run.items() if k not in ("lung_rads",)}
    out.append("<h2>Run</h2><table>" + "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
        for k, v in [("input", src)] + list(settings.items())) + "</table>")
    for m in getattr(result, "messages", ()) or ():
        out.append(f"<p class='small'>Note: {_e(m)}</p>")
    out.append(f"<p class='disclaimer'>{_e(DISCLAIMER)}</p></body></html>\n")
    return "\n".join(out)


def write_report_html(result, out_dir, pictures_dir=None) -> Path:
    """Write ``out_dir/report.html`` (``out_dir``: the staged folder of
    :func:`NoduleMTLLib.outputs.writer.write_result_set`, which makes the set all-or-nothing).  Returns its path.

    Raises:
        OSError: the file cannot be written.
    """
    out = Path(out_dir) / REPORT_FILE
    out.write_text(report_html(result, pictures_dir), encoding="utf-8")
    return out
