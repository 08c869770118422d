"""Annotator refinement loop: re-classify a user-edited mask, export it for fine-tuning.

After a click analysis the user may correct the nodule mask (Segment Editor in Slicer, or
any label editor).  :func:`reclassify_from_mask` then recomputes the measurements and the
networks' malignancy (and sign) probabilities from the *edited* mask, without
re-segmenting; :func:`export_for_training` writes the case (HU crop, mask, labels) in the
format ``training.data.load_user_cases`` reads, so corrected cases can fine-tune the
networks.

How the classification follows the edited mask (issue 5, item 5; not specified in the
papers, which classify their own segmentations - our design):

The click path classifies the mask it reports with the same function
(:func:`NoduleMTLLib.inference.classify.classify_mask`), so re-classifying an unchanged mask with
its original click gives the analysis' answer back (issue 24).

* Every network sees the same axial patch grid as in the click path
  (:meth:`NoduleMTLLib.inference.pipeline.Click2DNetwork.grid`), centred on the original
  click when it is given, else on the edited mask's centroid, at the smallest zoom of
  :data:`NoduleMTLLib.inference.pipeline.ZOOMS` at which the mask does not touch the patch
  border (so it is not clipped).
* The edited mask is resampled onto that grid (linear, threshold 0.5); the network runs on
  the patch slices the mask covers, and the slice malignancy logits are aggregated with
  :func:`NoduleMTLLib.inference.aggregation.nodule_logit_from_slices`, weighted by the edited mask's
  area on each slice.  Networks whose classifier takes no mask (LNMSNet, detection-guided,
  DSMT-Net) therefore follow the edit through the slices and weights only.
* Networks whose classifier takes the mask as an input channel - MT-Net's Class-net
  (MT-Net Section 3.2.4: CT patch + coarse mask) - get the edited mask in that channel
  instead of their own coarse mask: ``model.classnet(cat([x, mask], 1))``.
"""

from __future__ import annotations

import csv
import io as _io
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..core.consensus import MaskBox
from ..core.device import resolve_device
from ..core.io import CTVolume, InputError
from ..core.postprocess import measure_again
from ..core.results import NetworkOutput, NoduleResult
from ..models.registry import DEFAULT_NETWORKS, NETWORKS, check_network_ids, load_network
from .classify import classify_mask, model_device
from .pipeline import ZOOMS, Click2DNetwork

#: Input grid used for a network given through ``networks=`` that is not (yet) registered:
#: the house input of the click networks (96 x 96 px at 0.8 mm, ``networks.lnmsnet``).
DEFAULT_INPUT_SPEC = {"size_px": 96, "spacing_mm": 0.8}

#: Message stored in the result of a re-classification.
RECLASSIFIED_MESSAGE = "re-classified from an edited mask (not re-segmented)"


class _PatchNetwork(Click2DNetwork):
    """:class:`Click2DNetwork` for a network that may not be in the registry (input grid given)."""

    def __init__(self, network_id: str, model: torch.nn.Module, device: torch.device, size: int, spacing: float):
        self.network_id, self.model, self.device, self.batch = network_id, model, device, 32
        self.size, self.spacing = int(size), float(spacing)


def _check_mask(ct: CTVolume, mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(ct.shape_zyx):
        raise InputError(f"Mask has shape {mask.shape}, the CT has (z, y, x) = {tuple(ct.shape_zyx)}: "
                         "the mask must be on the CT's voxel grid")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.integer):
            raise InputError(f"Mask must be boolean or integer (0/1), got {mask.dtype}")
        mask = mask != 0
    if not mask.any():
        raise InputError("The mask is empty: nothing to re-classify or export (was the segment erased?)")
    return mask


def classify_mask_with_network(net: Click2DNetwork, ct: CTVolume, mask: np.ndarray, center_lps) -> dict:
    """One network's malignancy (and sign) probabilities for a fixed mask (no segmentation used).

    Args:
        net: the network wrapper (input grid, model in eval mode, device).
        ct: the CT (HU, LPS).
        mask: bool (z, y, x) on the CT grid (or a :class:`~NoduleMTLLib.core.consensus.MaskBox`), not empty.
        center_lps: patch centre (world LPS mm), normally the mask centroid.

    Returns:
        :func:`NoduleMTLLib.inference.classify.classify_mask`'s dict (the click path classifies
        the mask it reports with the same function: an unchanged mask gets the same answer).
    """
    return classify_mask(net, ct, mask, center_lps, ZOOMS)


def reclassify_from_mask(ct: CTVolume, mask_zyx_bool, network_ids: Sequence[str] = DEFAULT_NETWORKS, device="auto",
                         networks: dict | None = None, nodule_id: int = 1, point_lps=None,
                         size_correction: dict | None = None) -> NoduleResult:
    """Measurements and network probabilities of a given (e.g. user-edited) nodule mask.

    No segmentation is run: the mask is taken as it is.  See the module docstring for how
    each network classifies it.

    Args:
        ct: the CT (HU, LPS geometry).
        mask_zyx_bool: bool (or 0/1 integer) array, shape ``ct.shape_zyx`` = (z, y, x).
        network_ids: networks to run (registry ids; others only when given in ``networks``).
        device: "auto" | "cpu" | "cuda" | "mps" (used for networks loaded here; a model given
            in ``networks`` runs where its parameters are).
        networks: optional pre-loaded ``{id: torch module in eval mode}``.
        nodule_id: ``id`` of the returned result.
        point_lps: the original click (world LPS mm) to keep in the result; default the
            mask centroid.
        size_correction: the size correction the nodule was reported with
            (``NoduleResult.size_correction``); kept only while the mask is unchanged (its axes
            still measure the recorded ones: :func:`NoduleMTLLib.core.postprocess.measure_again`),
            so the unchanged mask gets the analysis' sizes back and an edited one its own.

    Returns:
        :class:`NoduleResult` with ``found=True``, ``mask`` (the input mask, bool, not a
        copy of an edit: the caller's array is not modified), the measurements of
        :func:`NoduleMTLLib.core.postprocess.measure_nodule` (mm, mm^3, HU), and per network a
        :class:`NetworkOutput` (``dice_with_final`` None: no network mask is computed).
        ``message`` says it was re-classified (and whether the mask was clipped).

    Raises:
        InputError: mask of another shape, empty mask, no networks, unknown network.
        WeightsError: weights missing or failing their checksum.
        DeviceError: unavailable device.
    """
    mask = _check_mask(ct, mask_zyx_bool)
    ids = list(network_ids)
    if not ids:
        raise InputError("No networks given: choose at least one network to re-classify with")
    given = networks or {}
    check_network_ids(ids, extra=given)
    meas = measure_again(mask, ct, size_correction)
    box = MaskBox.from_full(mask)  # the mask's bounding box: resampled without a CT-sized image
    # the patch is centred where the click path centred it (the original click) when it is known,
    # so an unchanged mask is classified on the click path's own patch grid; else on the centroid
    center = tuple(float(v) for v in point_lps) if point_lps is not None else meas["centroid_lps_mm"]
    dev = resolve_device(device) if any(n not in given for n in ids) else torch.device("cpu")
    res = NoduleResult(id=int(nodule_id), point_lps_mm=tuple(float(v) for v in (point_lps if point_lps is not None else center)),
                       found=True, mask=mask, message=RECLASSIFIED_MESSAGE)
    for k, v in meas.items():
        setattr(res, k, v)
    notes = []
    for nid in ids:
        model = given.get(nid) or load_network(nid, dev)
        spec = NETWORKS[nid].input_spec if nid in NETWORKS else DEFAULT_INPUT_SPEC
        net = _PatchNetwork(nid, model, model_device(model, dev), spec["size_px"], spec["spacing_mm"])
        out = classify_mask_with_network(net, ct, box, center)
        p = out["malignancy_probability"]
        res.networks[nid] = NetworkOutput(nid, None if math.isnan(p) else round(p, 4), out["sign_probabilities"], None)
        if out["clipped"]:
            notes.append(f"{nid}: mask larger than the largest patch, classified on the clipped part")
    if notes:
        res.message += "; " + "; ".join(notes)
    return res


# ---------------------------------------------------------------------------
# export for training
# ---------------------------------------------------------------------------

#: Rating names (LIDC-IDRI characteristics, median of readers, 1-5 or 1-6) accepted as labels;
#: the same names as ``training.data.RATINGS``.
RATING_KEYS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin", "lobulation", "spiculation",
               "texture")
#: Every key accepted in the ``labels`` of :func:`export_for_training`.
LABEL_KEYS = ("patient_id", "malignancy", "label") + RATING_KEYS
#: Columns of ``labels.csv`` (ratings: empty when not given).
LABELS_CSV_COLUMNS = ("case_id", "patient_id", "image_file", "mask_file", "malignancy", "label", "spacing_x_mm",
                      "spacing_y_mm", "spacing_z_mm", "n_voxels", "source") + RATING_KEYS
#: In-plane half-size (voxels) the exported crop covers at least around the mask centre,
#: so 128 x 128 training slices (the ``lidc_slices`` size) can be cut at native spacing.
MIN_HALF_SIZE_VOX = 64
#: Margin (mm) around the mask's bounding box in-plane; slices added above and below.
MARGIN_MM = 10.0
MARGIN_SLICES = 2


def malignancy_label(rating: float) -> int:
    """Binary label of a 1-5 malignancy rating: 1 if >= 4, 0 if <= 2, -1 (excluded) between.

    The rule of ``training.data.malignancy_label`` (LIDC convention), repeated here because
    the Slicer module does not ship the training package.
    """
    if rating >= 4:
        return 1
    if rating <= 2:
        return 0
    return -1


def _check_labels(labels: dict | None) -> dict:
    labels = dict(labels or {})
    bad = [k for k in labels if k not in LABEL_KEYS]
    if bad:
        raise InputError(f"Unknown label(s) {', '.join(map(str, bad))}; allowed: {', '.join(LABEL_KEYS)}")
    out: dict = {}
    if labels.get("patient_id") not in (None, ""):
        out["patient_id"] = str(labels["patient_id"])
    if labels.get("malignancy") not in (None, ""):
        r = float(labels["malignancy"])
        if not 1 <= r <= 5:
            raise InputError(f"malignancy rating must be in [1, 5], got {r:g}")
        out["malignancy"] = r
    if labels.get("label") not in (None, ""):
        lab = int(labels["label"])
        if lab not in (-1, 0, 1):
            raise InputError(f"label must be 1 (malignant), 0 (benign) or -1 (unknown), got {lab}")
        if "malignancy" in out and malignancy_label(out["malignancy"]) not in (-1, lab):
            raise InputError(f"label {lab} contradicts malignancy rating {out['malignancy']:g}")
        out["label"] = lab
    elif "malignancy" in out:
        out["label"] = malignancy_label(out["malignancy"])
    else:
        out["label"] = -1
    for k in RATING_KEYS:
        if labels.get(k) not in (None, ""):
            v = float(labels[k])
            if not 1 <= v <= 6:
                raise InputError(f"rating {k} must be in [1, 6] (LIDC scale), got {v:g}")
            out[k] = v
    return out


def safe_case_id(name: str) -> str:
    """A file-name-safe case id: letters, digits, '-', '_' and '.' kept, anything else '_'."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    if not s:
        raise InputError(f"Case id {name!r} has no usable character")
    return s


def crop_box(ct: CTVolume, mask: np.ndarray) -> tuple[list[int], list[int]]:
    """(start_ijk, size_ijk) of the exported crop: mask bounding box + :data:`MARGIN_MM`
    in-plane (at least :data:`MIN_HALF_SIZE_VOX` voxels each side of the box centre) and
    :data:`MARGIN_SLICES` slices along k, clamped to the CT."""
    zz, yy, xx = np.nonzero(mask)
    lo = np.array([xx.min(), yy.min(), zz.min()]); hi = np.array([xx.max(), yy.max(), zz.max()])
    sp = np.asarray(ct.spacing)
    size = np.asarray(ct.image.GetSize())
    start, stop = lo.copy(), hi.copy()
    for a in (0, 1):
        c = (lo[a] + hi[a]) / 2.0
        half = max((hi[a] - lo[a]) / 2.0 + MARGIN_MM / sp[a], MIN_HALF_SIZE_VOX)
        start[a], stop[a] = int(math.floor(c - half)), int(math.ceil(c + half))
    start[2], stop[2] = lo[2] - MARGIN_SLICES, hi[2] + MARGIN_SLICES
    start = np.clip(start, 0, size - 1); stop = np.clip(stop, 0, size - 1)
    return [int(v) for v in start], [int(v) for v in stop - start + 1]


def _read_labels_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def export_for_training(ct: CTVolume, mask_zyx_bool, labels: dict | None, out_dir, case_id: str,
                        overwrite: bool = False) -> dict:
    """Write one (corrected) case for fine-tuning: HU crop, mask, and a row of ``labels.csv``.

    Files, in ``out_dir`` (created):

    * ``<case_id>_ct.nrrd``: the CT cropped around the mask (:func:`crop_box`), CT pixel
      type (HU), the CT's own voxel grid and LPS geometry (origin, spacing, direction);
    * ``<case_id>_mask.nrrd``: uint8 0/1 mask on the same grid;
    * ``labels.csv``: one row per case, columns :data:`LABELS_CSV_COLUMNS` (``label`` 1 / 0
      / -1 from the malignancy rating by the LIDC rule, see :func:`malignancy_label`,
      unless given; spacing in mm; ratings empty when not given).

    Written atomically: each file goes to a temporary file in ``out_dir`` and is renamed;
    ``labels.csv`` is rewritten in full (temporary file + rename) after both images are in
    place, so a failure leaves no case half-listed.  Read back by
    ``training.data.load_user_cases``.

    Args:
        ct: the CT (HU, LPS).
        mask_zyx_bool: bool (z, y, x) mask on the CT grid (the corrected nodule).
        labels: annotator labels, keys in :data:`LABEL_KEYS`: ``patient_id``, ``malignancy``
            (rating 1-5), ``label`` (1 / 0 / -1), LIDC ratings (:data:`RATING_KEYS`, 1-6).
        out_dir: output folder.
        case_id: unique case name (made file-name safe with :func:`safe_case_id`).
        overwrite: replace a case of the same id (otherwise an error).

    Returns:
        ``{"image": Path, "mask": Path, "labels_csv": Path, "case_id": str}``.

    Raises:
        InputError: mask of another shape / empty, bad labels, case id already exported.
        OSError: the folder cannot be written (nothing is listed then).
    """
    mask = _check_mask(ct, mask_zyx_bool)
    lab = _check_labels(labels)
    cid = safe_case_id(case_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "labels.csv"
    rows = _read_labels_csv(csv_path)
    if any(r.get("case_id") == cid for r in rows):
        if not overwrite:
            raise InputError(f"Case {cid!r} is already in {csv_path}; choose another case id or overwrite")
        rows = [r for r in rows if r.get("case_id") != cid]
    start, size = crop_box(ct, mask)
    ct_crop = sitk.RegionOfInterest(ct.image, size, start)
    m_img = sitk.GetImageFromArray(mask.astype(np.uint8))
    m_img.CopyInformation(ct.image)
    m_crop = sitk.RegionOfInterest(m_img, size, start)
    if int(sitk.GetArrayViewFromImage(m_crop).sum()) != int(mask.sum()):
        raise AssertionError("crop lost mask voxels")  # crop_box covers the bounding box: cannot happen
    img_path, mask_path = out / f"{cid}_ct.nrrd", out / f"{cid}_mask.nrrd"
    sp = ct.spacing
    row = {"case_id": cid, "patient_id": lab.get("patient_id", ""), "image_file": img_path.name, "mask_file": mask_path.name,
           "malignancy": lab.get("malignancy", ""), "label": lab["label"], "spacing_x_mm": f"{sp[0]:.6g}",
           "spacing_y_mm": f"{sp[1]:.6g}", "spacing_z_mm": f"{sp[2]:.6g}", "n_voxels": int(mask.sum()),
           "source": ct.source}
    for k in RATING_KEYS:
        row[k] = lab.get(k, "")
    rows.append(row)
    head = list(LABELS_CSV_COLUMNS) + sorted({k for r in rows for k in r} - set(LABELS_CSV_COLUMNS))
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=head, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    tmps = []
    try:
        for image in (ct_crop, m_crop):
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".nrrd", dir=out)
            os.close(fd); tmps.append(tmp)
            sitk.WriteImage(image, tmp, True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-labels-", suffix=".csv", dir=out)
        os.close(fd); tmps.append(tmp)
        Path(tmp).write_text(buf.getvalue())
        os.replace(tmps[0], img_path)
        os.replace(tmps[1], mask_path)
        os.replace(tmps[2], csv_path)
    finally:
        for t in tmps:
            if os.path.exists(t):
                os.remove(t)
    return {"image": img_path, "mask": mask_path, "labels_csv": csv_path, "case_id": cid}
