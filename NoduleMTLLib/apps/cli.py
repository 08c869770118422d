"""``nodulemtl``: the command line of NoduleMTL.

    nodulemtl analyze CT --point X Y Z [--point ...] [--lps] [--networks dsmtnet]
                         [--device auto|cpu|cuda] [--mask first|consensus] --out DIR [--overwrite]
    nodulemtl analyze CT --detect [--threshold default|adaptive|0.x] [--networks dsmtnet|none]
                         [--device auto|cpu|cuda] --out DIR
    nodulemtl batch INPUT_DIR_OR_LIST --out DIR [--points POINTS_CSV] [--lps]
                    [--networks dsmtnet] [--device auto] [--overwrite]
                    [--workers N | --scheduler tcp://HOST:8786]
    nodulemtl pacs --url URL (--study UID ... | --since YYYY-MM-DD) [--points CSV] [--detect] --out DIR [--store]
    nodulemtl reclassify CT --mask MASK [--mask ...] [--id N ...] [--point X Y Z ...] [--result NODULES_JSON]
                         [--networks dsmtnet] [--device auto] --out DIR

CT is an image file (NRRD, NIfTI, MetaImage) or a DICOM series folder.  Points are world
millimetres, RAS (as 3D Slicer shows them) unless ``--lps``.  Writes DIR/labels.nrrd,
DIR/segmentation.seg.nrrd, DIR/nodules.json and DIR/nodules.csv, all or nothing; a DIR that
already holds outputs is refused unless ``--overwrite`` (rules: :mod:`NoduleMTLLib.core.safe_output`).
Exit codes: 0 success, one per error class otherwise (:mod:`NoduleMTLLib.core.errors`, docs/errors.md;
3 bad input, 5 not a CT, 7 weights, 10 output folder, ...), 2 usage error, 130 Ctrl-C.
``batch`` runs the same analysis over many CTs (see :mod:`NoduleMTLLib.apps.batch`): exit code 0
when no case failed, 1 otherwise.  ``pacs`` runs it over CT studies of a DICOMweb archive and
stores the DICOM SEG + SR back (see :mod:`NoduleMTLLib.apps.pacs`).  ``reclassify`` measures and classifies given (edited) masks
without segmenting (the Slicer module's *Re-classify from edited mask*, run in its worker).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

#: Help of ``--allow-non-ct`` (analyze, batch, reclassify).
ALLOW_NON_CT_HELP = ("analyse a DICOM series whose Modality / SOP class is not CT (phantoms, tests); refused otherwise. "
                     "Recorded in nodules.json (input.non_ct_allowed)")


def _progress_bar(disable: bool, progress_format: str = "bar"):
    if progress_format == "lines":  # machine-readable, for the Slicer module's background run
        from ..core.progress import LineProgress
        cb = LineProgress()
        return cb, cb
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", disable=disable, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed} {postfix}")

    def cb(fraction: float, message: str):
        bar.n = int(round(100 * fraction)); bar.set_postfix_str(message); bar.refresh()

    return bar, cb


def build_parser() -> argparse.ArgumentParser:
    from ..core.device import DEVICE_CHOICES
    from ..core.safe_output import out_dir_arg
    from ..models.registry import DEFAULT_DETECTOR, DEFAULT_NETWORKS
    from ..service.analysis import MASK_CHOICES
    from .options import threshold_arg

    ap = argparse.ArgumentParser(prog="nodulemtl", description="Pulmonary nodule segmentation and characterisation on chest CT.")
    ap.add_argument("--version", action="version", version=f"NoduleMTL {__import__('NoduleMTLLib').__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("review", add_help=False, help="review findings in a web browser: nodulemtl review [CT] [--results DIR] "
                   "[--host 127.0.0.1] [--port N] (see docs/review.md)")
    a = sub.add_parser("analyze", help="segment and characterise the nodule at each clicked point")
    a.add_argument("ct", help="CT image file (.nrrd, .nii[.gz], .mha/.mhd) or DICOM series folder")
    a.add_argument("--point", nargs=3, type=float, action="append", metavar=("X", "Y", "Z"),
                   help="world point in mm (RAS unless --lps); repeat for several nodules (required unless --detect)")
    a.add_argument("--detect", action="store_true",
                   help=f"search the whole scan for nodules ({DEFAULT_DETECTOR}) instead of analysing clicked points; "
                        "--networks then classifies each found nodule ('none': detection only)")
    a.add_argument("--threshold", default="default", type=threshold_arg,
                   help="--detect: 'default' (the two-stage search's operating point, chosen on validation scans for "
                        "<= 2 false positives per scan), 'adaptive' (every candidate of the detector's adaptive "
                        "threshold: highest sensitivity) or a minimum score in [0, 1]")
    a.add_argument("--lps", action="store_true", help="points are LPS (DICOM/ITK) instead of RAS (Slicer)")
    a.add_argument("--allow-non-ct", action="store_true", help=ALLOW_NON_CT_HELP)
    a.add_argument("--networks", default=",".join(DEFAULT_NETWORKS),
                   help=f"comma-separated network ids (default {','.join(DEFAULT_NETWORKS)}: the measured default)")
    a.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="compute device (default auto: CUDA if present)")
    a.add_argument("--mask", default="first", choices=MASK_CHOICES,
                   help="reported mask: the first network's (default) or the networks' consensus (voxels of at least "
                        "half of them; 2 networks: union); nodules.json has the consensus figures either way")
    a.add_argument("--out", required=True, type=out_dir_arg,
                   help="output folder (created when the results are ready; must not be or contain the input)")
    a.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --out (refused otherwise)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument("--dicom-seg", action="store_true",
                   help="also write DIR/segmentation.dcm: DICOM SEG of the nodules referencing the input series "
                        "(input must be a DICOM series folder)")
    from . import reporting
    reporting.add_arguments(a)
    a.add_argument("--progress-format", default="bar", choices=("bar", "lines"),
                   help="bar: progress bar on stderr; lines: flushed <filter-progress>F</filter-progress> and "
                        "<filter-comment>TEXT</filter-comment> lines on stdout (machine-readable)")
    b = sub.add_parser("batch", help="analyze many CTs (folder or list file), one output folder per case + summary.csv")
    b.add_argument("input", help="folder of CT files / DICOM series folders, or a text file listing one path per line")
    b.add_argument("--out", required=True, type=out_dir_arg, help="output folder: <case>/ per case and summary.csv")
    b.add_argument("--points", help="CSV case,x,y,z[,frame]: points per case (mm, RAS unless frame LPS or --lps)")
    b.add_argument("--lps", action="store_true", help="points without a frame are LPS (DICOM/ITK) instead of RAS")
    b.add_argument("--allow-non-ct", action="store_true", help=ALLOW_NON_CT_HELP)
    b.add_argument("--networks", default=",".join(DEFAULT_NETWORKS),
                   help=f"comma-separated network ids (default {','.join(DEFAULT_NETWORKS)}: the measured default)")
    b.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="compute device (default auto: CUDA if present)")
    b.add_argument("--overwrite", action="store_true", help="recompute cases whose outputs already exist")
    b.add_argument("--threshold", default="default", type=threshold_arg,
                   help="cases without points (whole-scan search): 'default' (operating point), 'adaptive' "
                        "(every candidate) or a minimum score in [0, 1]")
    b.add_argument("--dicom-seg", action="store_true",
                   help="also write <case>/segmentation.dcm (DICOM SEG) for cases that are DICOM series folders")
    reporting.add_arguments(b, batch=True)
    from . import cluster
    cluster.add_arguments(b)  # --workers N / --scheduler ADDRESS (Dask)
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    from . import pacs
    pacs.add_parser(sub)
    r = sub.add_parser("reclassify", help="measure and classify given (e.g. edited) nodule masks without segmenting")
    r.add_argument("ct", help="CT image file or DICOM series folder")
    r.add_argument("--mask", action="append", required=True,
                   help="mask image on the CT grid (same size, spacing, origin, direction): non-zero voxels = the "
                        "nodule; a label map with several values (e.g. analyze's labels.nrrd) = one nodule per value, "
                        "the value its id; repeat for several nodules")
    r.add_argument("--id", type=int, action="append", help="nodule id of each --mask, in order (default 1..N)")
    r.add_argument("--point", nargs=3, type=float, action="append", metavar=("X", "Y", "Z"),
                   help="world point (mm, RAS unless --lps) of each --mask, in order (the original click; default: "
                        "the mask centroid)")
    r.add_argument("--lps", action="store_true", help="points are LPS (DICOM/ITK) instead of RAS (Slicer)")
    r.add_argument("--result", metavar="NODULES_JSON",
                   help="nodules.json of the analysis the masks come from: each nodule (matched by id) keeps the "
                        "size correction it was reported with while its mask is unchanged")
    r.add_argument("--allow-non-ct", action="store_true", help=ALLOW_NON_CT_HELP)
    r.add_argument("--networks", default=",".join(DEFAULT_NETWORKS),
                   help=f"comma-separated network ids (default {','.join(DEFAULT_NETWORKS)}: the measured default)")
    r.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="compute device (default auto: CUDA if present)")
    r.add_argument("--out", required=True, type=out_dir_arg,
                   help="output folder (the result set of analyze; must not be or contain the inputs)")
    r.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out (refused otherwise)")
    r.add_argument("--dicom-seg", action="store_true",
                   help="also write DIR/segmentation.dcm (input must be a DICOM series folder)")
    reporting.add_arguments(r)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--progress-format", default="bar", choices=("bar", "lines"), help="as for analyze")
    return ap


def _reclassify(args, models=None) -> int:
    """``nodulemtl reclassify``: :func:`NoduleMTLLib.service.analysis.reclassify` on the given masks, outputs as ``analyze``."""
    from ..core.errors import NoduleMTLError, one_line
    from ..core.io import ras_to_lps, read_ct
    from ..core.mask_input import read_masks
    from ..core.safe_output import OutputSet
    from ..outputs.writer import options_from_args, write_result_set
    from ..service.analysis import reclassify, split_networks
    from . import reporting

    try:
        # checks --out (not an input, no earlier outputs unless --overwrite), locks it; created at commit()
        with OutputSet(args.out, inputs=[args.ct, *args.mask], overwrite=args.overwrite) as outset:
            ct = read_ct(args.ct, allow_non_ct=args.allow_non_ct)
            points = [tuple(p) if args.lps else ras_to_lps(p) for p in args.point] if args.point else None
            # on the CT's grid (size, spacing, origin, direction); a multi-label mask: one nodule per label
            masks, ids, points = read_masks(args.mask, ct, args.id, points)
            corrections = _size_corrections(args.result, ids or list(range(1, len(masks) + 1))) if args.result else None
            bar, cb = _progress_bar(args.quiet, args.progress_format)
            try:
                res = reclassify(ct, masks, nodule_ids=ids, points_lps=points, network_ids=split_networks(args.networks),
                                 device=args.device, progress=cb, models=models, patient=reporting.patient_options(args),
                                 notify=lambda m: print(f"nodulemtl: warning: {m}", file=sys.stderr, flush=True),
                                 size_corrections=corrections)
            finally:
                bar.close()
            # the same result set as analyze (labels, seg.nrrd, JSON, CSV, report, pictures)
            write_result_set(res, ct, outset, options_from_args(args), warn=_warn)
    except NoduleMTLError as e:  # every library error; programming errors keep their traceback
        print(f"nodulemtl: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    print_summary(res)
    return 0


def _size_corrections(path, ids) -> list:
    """Each nodule id's ``size_correction`` in the analysis' ``nodules.json`` (None for an id it lacks).

    Raises:
        InputError: the file cannot be read or is not a NoduleMTL result.
    """
    import json

    from ..core.io import InputError

    try:
        record = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as e:
        raise InputError(f"--result {path}: not a readable nodules.json ({e})") from None
    nodules = record.get("nodules") if isinstance(record, dict) else None
    if not isinstance(nodules, list) or not all(isinstance(n, dict) and isinstance(n.get("id"), int) for n in nodules):
        raise InputError(f"--result {path}: not a NoduleMTL nodules.json (no list of nodules with ids)")
    by_id = {n["id"]: n.get("size_correction") for n in nodules}
    return [by_id.get(int(i)) for i in ids]


def _batch(args) -> int:
    """Handler of ``nodulemtl batch`` (``args`` from the argparse subparser; the cases run by
    :class:`.batch.BatchRun`, in this process or as Dask tasks of :mod:`.cluster`); returns the exit code."""
    from pathlib import Path

    from tqdm import tqdm

    from ..core.errors import NoduleMTLError
    from ..models.registry import check_network_ids
    from ..service.analysis import split_networks
    from . import batch, cluster

    out = Path(args.out)
    try:
        from ..core.safe_output import check_out_dir
        check_out_dir(out, [args.input], overwrite=True)  # not the input; case folders are checked one by one
        cases = batch.find_cases(args.input, exclude=[out])
        points = batch.read_points_csv(args.points, lps=args.lps) if args.points else {}
        unused = [k for k in points if not any(batch.points_for(c, {k: [1]}) for c in cases)]
        if unused:
            print(f"nodulemtl: warning: points for unknown case(s) ignored: {', '.join(unused)}", file=sys.stderr)
        nets = tuple(split_networks(args.networks))
        check_network_ids(nets, allow_empty=False, error=batch.BatchError)
        run = batch.BatchRun(cases, out, points, nets, args.device, args.overwrite, dicom_seg=bool(args.dicom_seg),
                             threshold=args.threshold, report_options=args)
        bar = tqdm(total=len(cases), unit="case", disable=args.quiet, file=sys.stderr)

        def on_case(i, case, r):
            bar.set_postfix_str(f"{case.name}: {r.status}")
            bar.update(1)
            if not args.quiet:
                bar.write(cluster.status_line(r), file=sys.stderr)

        try:  # --workers N / --scheduler: each case a Dask task (NoduleMTLLib.apps.cluster)
            results = cluster.main(run, args, on_case, say=lambda m: bar.write(m, file=sys.stderr)) \
                if cluster.wanted(args) else run.run(on_case)
        finally:
            bar.close()
    except NoduleMTLError as e:  # every library error; programming errors keep their traceback
        print(f"nodulemtl: error: {batch._one_line(e)}", file=sys.stderr)
        return e.exit_code
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "skipped", "done-before")}
    for r in results:
        if r.status == "failed":
            print(f"{r.case}: failed: {r.message}", file=sys.stderr)
    print(f"{len(results)} cases: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" -> {out / batch.SUMMARY_FILE}")
    return 1 if counts["failed"] else 0


def _review(argv) -> int:
    """``nodulemtl review``: the web reviewer, which lives beside the Slicer module
    (``NoduleMTL/NoduleMTLReview``, it needs ``slicer``) and so runs from a source checkout only."""
    import importlib
    from pathlib import Path

    module_dir = Path(__file__).resolve().parents[2] / "NoduleMTL"
    if not (module_dir / "NoduleMTLReview" / "app.py").is_file():
        print("nodulemtl review: error: needs a source checkout of NoduleMTL (NoduleMTL/NoduleMTLReview not found)",
              file=sys.stderr)
        return 2
    if str(module_dir) not in sys.path:
        sys.path.insert(0, str(module_dir))
    try:
        app = importlib.import_module("NoduleMTLReview.app")
    except ImportError as e:
        print(f"nodulemtl review: error: {e}; install the 'review' dependency group (uv sync)", file=sys.stderr)
        return 2
    return app.main(argv)


def _warn(message: str) -> None:
    print(f"nodulemtl: warning: {message}", file=sys.stderr, flush=True)


def print_summary(res) -> None:
    """One line per nodule on stdout, from the reported fields (:func:`NoduleMTLLib.outputs.fields.summary_line`;
    the networks' raw outputs labelled as such), then the per-scan Lung-RADS category."""
    from ..outputs.fields import detection_phrase, raw_network_fields, summary_line

    for m in res.messages:
        print(f"nodulemtl: note: {m}", file=sys.stderr)
    raw = raw_network_fields(res.run.get("networks", []) or [])
    for n in res.nodules:
        if not n.found:
            print(f"Nodule {n.id}: not found ({n.message})")
            continue
        d = n.to_dict()
        head = f"Nodule {n.id}: "
        if n.detection is not None:
            head += f"{detection_phrase(n.detection)}, RAS {tuple(round(v, 1) for v in n.point_ras_mm)}, "
        line = head + summary_line(d)
        raws = ", ".join(f"{f.key.split('.')[1]} {f.text(d)}" for f in raw if f.text(d))
        if raws:
            line += f" (raw network output: {raws})"
        c = n.consensus
        if c is not None and c.n_networks >= 2 and c.malignancy_probability is not None:
            line += f"; consensus {c.malignancy_probability:.2f}, disagreement {c.disagreement}"
        print(line)
    if (res.run or {}).get("lung_rads"):
        print(f"Lung-RADS (per scan, baseline rules): {res.run['lung_rads']['category']}")


def main(argv=None, models=None) -> int:
    """Run ``nodulemtl`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    ``models``: a :class:`~NoduleMTLLib.service.analysis.ModelCache` kept by the caller (the
    persistent worker, :mod:`NoduleMTLLib.apps.worker`) so networks load once across calls.
    Usage errors raise SystemExit(2) (argparse).  A library error
    (:class:`NoduleMTLLib.core.errors.NoduleMTLError`) prints one line and returns its class's
    ``exit_code``; Ctrl-C prints one line and returns 130 (the output folder keeps its
    previous set: :mod:`NoduleMTLLib.core.safe_output`).
    """
    from ..core.errors import EXIT_INTERRUPTED, NoduleMTLError, one_line

    try:
        return _main(argv, models)
    except NoduleMTLError as e:
        print(f"nodulemtl: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("nodulemtl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv, models) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["review"]:
        return _review(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if not any(n.strip() for n in args.networks.split(",")):
        ap.error(f"argument --networks: no network id in {args.networks!r}")
    from . import reporting
    reporting.prepare(args)  # --dicom-sr implies --dicom-seg
    if args.cmd == "batch":
        return _batch(args)
    if args.cmd == "pacs":
        from . import pacs
        return pacs.main(args)
    if args.cmd == "reclassify":
        return _reclassify(args, models)
    if bool(args.detect) == bool(args.point):
        ap.error("analyze needs either --point (one or more) or --detect")
    from ..core.errors import NoduleMTLError, one_line
    from ..core.io import InputError, ras_to_lps, read_ct
    from ..core.safe_output import OutputSet
    from ..outputs.writer import options_from_args, write_result_set
    from ..service.analysis import analyze, split_networks

    try:
        t0 = time.perf_counter()
        nets = split_networks(args.networks)
        # checks --out (not the input, no earlier outputs unless --overwrite), locks it; created at commit()
        with OutputSet(args.out, inputs=[args.ct], overwrite=args.overwrite) as outset:
            ct = read_ct(args.ct, allow_non_ct=args.allow_non_ct)
            if args.dicom_seg and ct.dicom_series_uid is None:
                raise InputError(f"{'--dicom-sr' if args.dicom_sr else '--dicom-seg'} needs a DICOM series folder as "
                                 f"input; {args.ct} is not one")
            pts = [tuple(p) if args.lps else ras_to_lps(p) for p in args.point or []]
            bar, cb = _progress_bar(args.quiet, args.progress_format)
            try:  # CUDA out of memory -> retried on the CPU (analysis service)
                res = analyze(ct, pts, detect=args.detect, network_ids=nets, device=args.device, mask=args.mask,
                              threshold=args.threshold, progress=cb, models=models,
                              patient=reporting.patient_options(args),  # Lung-RADS, Brock -> nodules.json / .csv
                              notify=lambda m: print(f"nodulemtl: warning: {m}", file=sys.stderr, flush=True))
            finally:
                bar.close()
            write_result_set(res, ct, outset, options_from_args(args), warn=_warn)  # stages, writes, commits
    except NoduleMTLError as e:  # every library error; programming errors keep their traceback
        print(f"nodulemtl: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    n_found = sum(n.found for n in res.nodules)
    print_summary(res)
    print(f"{n_found}/{len(res.nodules)} nodules segmented on {res.run['device']} in {time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
