"""The one declaration of the reported fields of a nodule: key, title, unit, format, getter.

Every presenter reads this list: ``nodules.csv`` (:func:`NoduleMTLLib.outputs.files.csv_rows`), the
segment tags of ``segmentation.seg.nrrd`` and of the Slicer segments (:func:`segment_tags`),
``report.html`` (:mod:`NoduleMTLLib.outputs.report_html`), the picture headers
(:func:`NoduleMTLLib.outputs.pictures.key_figures`), the command line's summary line
(:func:`summary_line`), the Slicer results table and the panel text
(``NoduleMTL/NoduleMTLMRML.py``, ``NoduleMTL/NoduleMTLText.py``).  A new field appears
everywhere by adding one line to :data:`REPORTED_FIELDS`.

The probability is the *reported* one (``malignancy_probability``: the calibrated
probability of the run's configuration, :mod:`NoduleMTLLib.models.calibration`), and the display
colour follows it (:func:`reported_color`).  The networks' own outputs are only secondary
fields labelled "raw network output" (:func:`raw_network_fields`).

Getters read the record of :meth:`NoduleMTLLib.core.results.NoduleResult.to_dict` (the
``nodules.json`` entry), so the same field list serves a live result and a file read back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    """One reported field.

    Attributes:
        key: dotted path in the nodule record (``nodules.json``), also the CSV column, the
            table column and (prefixed ``NoduleMTL.``) the segment tag.
        title: column / label title.
        unit: unit text ("mm", "mm3", "HU"; "" for none).
        fmt: ``str.format`` pattern of the value ("{:.1f}").
        description: tooltip text.
        kind: "float" | "int" | "str" (the Slicer table's column type).
        summary: shown in the one-line summaries (CLI line, picture header, panel).
        raw: a network's own output (secondary: shown only labelled as raw).
    """

    key: str
    title: str
    unit: str = ""
    fmt: str = "{}"
    description: str = ""
    kind: str = "float"
    summary: bool = False
    raw: bool = False

    def value(self, record: Mapping[str, Any] | Any):
        """The field's value in a nodule record (dict of ``NoduleResult.to_dict()`` or a
        ``NoduleResult``); None when absent."""
        d = record
        for part in _split_key(self.key):
            d = d.get(part) if isinstance(d, Mapping) else getattr(d, part, None)
            if d is None:
                return None
        if isinstance(d, float) and math.isnan(d):
            return None
        return d

    def text(self, record, unit: bool = True) -> str:
        """The value formatted (with its unit); "" when absent."""
        v = self.value(record)
        if v is None or v == "":
            return ""
        s = self.fmt.format(v)
        return f"{s} {self.unit}" if unit and self.unit else s

    @property
    def heading(self) -> str:
        """Title with its unit: "Long axis (mm)"."""
        return f"{self.title} ({self.unit})" if self.unit else self.title


def _split_key(key: str) -> list[str]:
    # "networks.<id>.malignancy_probability": network ids hold no dot
    return key.split(".")


#: The reported fields, in presentation order.
REPORTED_FIELDS: tuple[Field, ...] = (
    Field("diameter_mm", "Long axis", "mm", "{:.1f}",
          "Longest axial diameter (a click network's own mask: times its measured size correction, see size_correction)",
          summary=True),
    Field("short_axis_mm", "Short axis", "mm", "{:.1f}",
          "Longest diameter perpendicular to the long axis on the same slice (size-corrected as the long axis)",
          summary=True),
    Field("volume_mm3", "Volume", "mm3", "{:.0f}", "Segmented volume", summary=True),
    Field("mean_hu", "Mean", "HU", "{:.0f}", "Mean CT value inside the mask", summary=True),
    Field("solid_fraction", "Solid fraction", "", "{:.2f}", "Fraction of mask voxels >= -300 HU"),
    Field("type", "Type", "", "{}", "Radiological type estimate (solid / part-solid / ground-glass)", "str", summary=True),
    Field("malignancy_probability", "P(malignant)", "", "{:.2f}",
          "Reported malignancy probability: the calibrated probability of the run's networks "
          "(NoduleMTLLib.models.calibration; research use only)", summary=True),
    Field("lung_rads.category", "Lung-RADS", "", "{}",
          "Lung-RADS v2022 category, baseline rules (NoduleMTLLib.clinical.lung_rads; no prior-scan comparison)", "str",
          summary=True),
    Field("lung_rads.size_mm", "Mean diameter", "mm", "{:.1f}", "Lung-RADS size: mean of long and short axis"),
    Field("lung_rads.solid_component_mm", "Solid part", "mm", "{:.1f}",
          "Part-solid nodules: mean diameter of the largest solid component"),
    Field("lung_rads.rule", "Lung-RADS rule", "", "{}", "The guideline sentence that gave the category", "str"),
    Field("brock.probability", "Brock risk", "", "{:.3f}",
          "Brock (PanCan) full model, McWilliams et al. NEJM 2013: a different model from the networks", summary=True),
)

#: The reported probability field (colours, the one number of every output).
PROBABILITY = next(f for f in REPORTED_FIELDS if f.key == "malignancy_probability")


def raw_network_fields(network_ids: Iterable[str]) -> list[Field]:
    """Secondary fields: each network's own (uncalibrated) P(malignant), labelled as raw output."""
    return [Field(f"networks.{nid}.malignancy_probability", f"Raw network output {nid}", "", "{:.2f}",
                  f"P(malignant) output by {nid} before calibration (raw network output; the reported "
                  "probability is P(malignant))", raw=True)
            for nid in network_ids]


def reported_probability(record) -> float | None:
    """The reported (calibrated) P(malignant) of a nodule record, None when there is none."""
    v = PROBABILITY.value(record)
    return None if v is None else float(v)


def reported_color(record) -> tuple[float, float, float]:
    """Display colour (RGB 0-1) of a nodule: the ramp of :mod:`NoduleMTLLib.outputs.colors` on the reported probability."""
    from .colors import probability_color

    return probability_color(reported_probability(record))


def summary_line(record, fields: Sequence[Field] = REPORTED_FIELDS) -> str:
    """The summary fields of a nodule as one line: "Long axis 12.3 mm, ..., P(malignant) 0.87, Lung-RADS 4A"."""
    parts = []
    for f in fields:
        if f.summary:
            t = f.text(record)
            if t:
                parts.append(f"{f.title} {t}")
    return ", ".join(parts)


def detection_phrase(detection: Mapping | None) -> str:
    """How Find nodules found a nodule, for the CLI line and the Slicer panel ("" for a click).

    ``detection`` is ``NoduleResult.detection`` (``detection_record``): "detection score 0.95"
    at or above the operating point; "detection score 0.84, below the operating point 0.89:
    reported as a mass (236 mL outline)" for the mass rule; "found as a mass by its shape (no
    detector score; 91 mL outline)" for ``accepted_as == "mass_shape"``, whose score 0 is no score.
    """
    if not isinstance(detection, Mapping) or detection.get("score") is None:
        return ""
    how = detection.get("accepted_as")
    feats = detection.get("outline_features") or {}
    ml = f"; {feats['volume_ml']:.0f} mL outline" if isinstance(feats.get("volume_ml"), (int, float)) else ""
    if how == "mass_shape":
        return f"found as a mass by its shape (no detector score{ml})"
    text = f"detection score {float(detection['score']):.2f}"
    if how == "mass" and detection.get("score_threshold") is not None:
        text += (f", below the operating point {float(detection['score_threshold']):.2f}: reported as a mass"
                 f"{' (' + ml[2:] + ')' if ml else ''}")
    return text


#: Prefix of every segment tag NoduleMTL writes (seg.nrrd and Slicer segments).
TAG_PREFIX = "NoduleMTL."


def segment_tags(record) -> dict[str, str]:
    """The segment tags of a nodule (``segmentation.seg.nrrd`` and the Slicer segments): every
    reported field present (``NoduleMTL.<key>``), and the networks' raw outputs
    (``NoduleMTL.malignancy_probability.<id>``, ``NoduleMTL.sign_probability.<id>.<sign>``,
    ``NoduleMTL.dice_with_final.<id>``), the consensus, the detection score and the size correction
    (:data:`SIZE_CORRECTION_TAGS`).  Values as text
    (8 significant digits)."""
    d = record if isinstance(record, Mapping) else record.to_dict()
    p = TAG_PREFIX
    tags: dict[str, str] = {}
    for f in REPORTED_FIELDS:
        v = f.value(record)  # a live NoduleResult: unrounded measurements
        if v is not None and v != "":
            tags[p + f.key] = _tag(v)
    for nid, o in (d.get("networks") or {}).items():
        o = o or {}
        if o.get("malignancy_probability") is not None:
            tags[f"{p}malignancy_probability.{nid}"] = _tag(o["malignancy_probability"])
        for sign, v in (o.get("sign_probabilities") or {}).items():
            if v is not None:
                tags[f"{p}sign_probability.{nid}.{sign}"] = _tag(v)
        if o.get("dice_with_final") is not None:
            tags[f"{p}dice_with_final.{nid}"] = _tag(o["dice_with_final"])
    cons = d.get("consensus") or {}
    if cons.get("n_networks", 0) >= 2:
        for k in ("malignancy_probability", "disagreement"):
            if cons.get(k) is not None:
                tags[f"{p}consensus.{k}"] = _tag(cons[k])
    if d.get("detection"):
        tags[p + "detection.score"] = _tag(d["detection"]["score"])
    for k, v in (d.get("size_correction") or {}).items():
        if k in SIZE_CORRECTION_TAGS:
            tags[f"{p}size_correction.{k}"] = _tag(float(v))
    return tags


#: The numbers of a nodule's size correction kept as segment tags (``NoduleMTL.size_correction.<key>``):
#: a segment whose mask still measures ``measured_*`` gets the same correction back on re-reading.
SIZE_CORRECTION_TAGS = ("long_axis_factor", "short_axis_factor", "measured_long_axis_mm", "measured_short_axis_mm")


def _tag(v) -> str:
    if isinstance(v, float):
        return f"{v:.8g}"
    return str(v)
