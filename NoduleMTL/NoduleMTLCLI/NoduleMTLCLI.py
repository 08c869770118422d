#!/usr/bin/env python-real
"""NoduleMTL CLI: the click path as a Slicer scripted CLI module (batch / headless use).

Parameters (``NoduleMTLCLI.xml``, Slicer Execution Model; :func:`build_parser` mirrors it):

    inputVolume  (index 0)  CT volume file (Slicer hands over a temporary .nrrd)
    outputLabel  (index 1)  label map written on the input grid (uint16, value = nodule number)
    outputTable  (index 2)  results CSV (the columns of ``nodulemtl analyze``'s nodules.csv)
    --points FILE           markups ``.mrk.json`` or ``.fcsv``: one control point per nodule
                            (coordinate system from the file: LPS or RAS; mm)
    --detect                whole-scan detection (the registry's default detector) instead of
                            points; the click networks then classify each found nodule
    --threshold T           with --detect: 'default', 'adaptive' or a score in [0, 1]
    --networks IDS          comma-separated network ids (default dsmtnet, the measured default:
                            ``NoduleMTLLib.DEFAULT_NETWORKS``)
    --device auto|cpu|cuda|mps  compute device (CUDA out of memory -> retried on the CPU)

Progress is printed as ``<filter-progress>F</filter-progress>`` lines (F in [0, 1], flushed),
which Slicer shows in the CLI's progress bar.  Errors: one line ``NoduleMTLCLI: error: ...``
on stderr and exit code 1 (bad input, no points, missing weights, unavailable device,
unwritable output); 2 for usage errors.

Run it from Slicer (Modules > NoduleMTL CLI, or ``slicer.cli.run``), or headless with
``PythonSlicer NoduleMTLCLI.py CT.nrrd labels.nrrd nodules.csv --points F.mrk.json``.
Inside ``python-real`` there is no ``slicer.app``: everything here is file I/O; the analysis
itself is :func:`NoduleMTLLib.service.analysis.analyze` (the same service as ``nodulemtl analyze``).
"""

import argparse
import json
import os
import sys

_CLI_DIR = os.path.dirname(os.path.abspath(__file__))

#: Parameter names of the XML, in the order of its positional indices.
POSITIONAL = ("inputVolume", "outputLabel", "outputTable")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
#: Default of ``--networks`` (the XML's default too): ``NoduleMTLLib.DEFAULT_NETWORKS``, the
#: measured default, which this file cannot import before it has found the library (argparse
#: runs first); Testing/Python/test_module_layout.py checks it against the XML.
DEFAULT_NETWORK = "dsmtnet"


def _candidateRoots():
    """Folders that may hold ``NoduleMTLLib/``: beside this file, then each folder up the
    tree, each also with ``qt-scripted-modules/`` (installed layout: the CLI lives in
    ``lib/Slicer-X.Y/cli-modules/``, the library in ``lib/Slicer-X.Y/qt-scripted-modules/``;
    source layout: ``<repo>/NoduleMTL/NoduleMTLCLI/`` with the library at ``<repo>/``)."""
    roots = []
    d = _CLI_DIR
    while True:
        roots += [d, os.path.join(d, "qt-scripted-modules")]
        parent = os.path.dirname(d)
        if parent == d:
            return roots
        d = parent


def libraryRoot():
    """Folder that contains the ``NoduleMTLLib`` package, or None if it cannot be found."""
    for root in _candidateRoots():
        if os.path.isfile(os.path.join(root, "NoduleMTLLib", "__init__.py")):
            return root
    return None


def build_parser():
    """Argument parser matching ``NoduleMTLCLI.xml`` (checked by Testing/Python/test_batch.py)."""
    ap = argparse.ArgumentParser(prog="NoduleMTLCLI", description="Segment and characterise pulmonary nodules at points.")
    ap.add_argument("inputVolume", help="input CT volume (HU)")
    ap.add_argument("outputLabel", help="output label map (.nrrd), value = nodule number")
    ap.add_argument("outputTable", help="output results table (.csv)")
    ap.add_argument("--points", default="", help="markups file (.mrk.json or .fcsv), one point per nodule")
    ap.add_argument("--detect", action="store_true",
                    help="detect nodules in the whole scan instead of using points")
    ap.add_argument("--threshold", default="default",
                    help="with --detect: 'default' (operating point), 'adaptive' (every candidate) or a minimum score in [0, 1]")
    ap.add_argument("--networks", default=DEFAULT_NETWORK, help="comma-separated network ids (default: the measured default)")
    ap.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="compute device")
    return ap


class PointsError(ValueError):
    """The points file cannot be read or holds no usable point."""


def read_points_file(path):
    """LPS points (mm) of a ``.mrk.json`` or ``.fcsv`` markups file.

    Control points whose ``positionStatus`` is not ``defined`` (placeholders) are skipped.
    Raises PointsError for a missing/unreadable file or an unknown format.
    """
    if not os.path.isfile(path):
        raise PointsError(f"Points file not found: {path}")
    low = path.lower()
    try:
        if low.endswith(".fcsv"):
            try:
                from slicerio.markups import read_markups_fcsv
                data = read_markups_fcsv(path)
            except ImportError:
                data = _read_fcsv(path)
        elif low.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            raise PointsError(f"Points file {path}: use a .mrk.json or .fcsv markups file")
        points = []
        for m in data.get("markups", []):
            system = str(m.get("coordinateSystem", "LPS")).upper()
            if system not in ("LPS", "RAS"):
                raise PointsError(f"Points file {path}: coordinate system {system!r} is not LPS or RAS")
            for cp in m.get("controlPoints", []):
                if cp.get("positionStatus", "defined") != "defined":
                    continue
                x, y, z = (float(v) for v in cp["position"])
                points.append((x, y, z) if system == "LPS" else (-x, -y, z))
        return points
    except PointsError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PointsError(f"Cannot read points file {path}: {e}") from None


def _read_fcsv(path):
    """Minimal ``.fcsv`` reader (used when slicerio is absent): same dict shape as slicerio's."""
    system, cols, cps = "RAS", None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("#"):
                key, _, value = line[1:].partition("=")
                if key.strip() == "CoordinateSystem":
                    system = {"0": "RAS", "1": "LPS"}.get(value.strip(), value.strip())
                elif key.strip() == "columns":
                    cols = [c.strip() for c in value.split(",")]
                continue
            if line.strip():
                row = dict(zip(cols or ["id", "x", "y", "z"], line.split(",")))
                cps.append({"position": [row["x"], row["y"], row["z"]]})
    return {"markups": [{"coordinateSystem": system, "controlPoints": cps}]}


def progress(fraction, message=""):
    """Report progress to Slicer (a flushed ``<filter-progress>`` line)."""
    print(f"<filter-progress>{max(0.0, min(1.0, float(fraction))):.3f}</filter-progress>", flush=True)
    if message:
        print(f"<filter-comment>{message}</filter-comment>", flush=True)


def run(args):
    """Run the analysis for parsed ``args``; returns the exit code (0 ok, 1 error)."""
    root = libraryRoot()
    if root is None:
        print("NoduleMTLCLI: error: the NoduleMTLLib package was not found beside the CLI or up its folder tree",
              file=sys.stderr)
        return 1
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import SimpleITK as sitk

        from NoduleMTLLib.core.device import DeviceError
        from NoduleMTLLib.core.io import InputError, read_ct
        from NoduleMTLLib.models.registry import WeightsError
        from NoduleMTLLib.outputs.files import OutputError, csv_rows
        from NoduleMTLLib.service.analysis import analyze, detector_status, split_networks
    except ImportError as e:
        print(f"NoduleMTLCLI: error: {e}; open the NoduleMTL module once in Slicer to install its Python packages "
              "(torch via the PyTorch extension)", file=sys.stderr)
        return 1
    import csv

    try:
        progress(0.0, "reading")
        if args.detect and args.points:
            raise InputError("Give either a points file or --detect (whole-scan detection), not both")
        if not args.detect and not args.points:
            raise InputError("No points given: pass a markups file (.mrk.json or .fcsv) with one point per nodule")
        if args.detect:
            from NoduleMTLLib.detection.infer import parse_threshold
            try:
                parse_threshold(args.threshold)
            except ValueError as e:
                raise InputError(str(e)) from None
            ok, reason = detector_status()
            if not ok:
                raise InputError(f"{reason}; give --points instead")
        points = read_points_file(args.points) if args.points else []
        if args.points and not points:
            raise InputError(f"Points file {args.points} holds no defined control point")
        ct = read_ct(args.inputVolume)
        res = analyze(ct, points, detect=args.detect, network_ids=split_networks(args.networks), device=args.device,
                      threshold=args.threshold, progress=lambda f, m: progress(0.05 + 0.9 * f, m),
                      notify=lambda m: print(f"<filter-comment>{m}</filter-comment>", flush=True))
        lab = sitk.GetImageFromArray(res.label_array(ct.shape_zyx))
        lab.CopyInformation(ct.image)
        try:
            sitk.WriteImage(lab, args.outputLabel, True)
        except RuntimeError as e:
            raise OutputError(f"Cannot write {args.outputLabel}: {' '.join(str(e).split())}") from None
        head, rows = csv_rows(res)
        try:
            with open(args.outputTable, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=head)
                w.writeheader()
                w.writerows(rows)
        except OSError as e:
            raise OutputError(f"Cannot write {args.outputTable}: {e.strerror or e}") from None
    except (InputError, PointsError, WeightsError, DeviceError, OutputError, KeyError) as e:
        print(f"NoduleMTLCLI: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    progress(1.0)
    found = sum(n.found for n in res.nodules)
    print(f"{found}/{len(res.nodules)} nodules segmented on {res.run['device']}", flush=True)
    return 0


def main(argv=None):
    """Parse the command line (Slicer's, or ``argv``) and run; returns the exit code."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
