"""Memory and time of the DICOM SEG of 20 nodules on a whole-scan grid (prints figures; not a test).

    NODULEMTL_CACHE=/work/cache uv run --frozen python Testing/Benchmarks/bench_seg_memory.py \\
        [--dicom /work/dicom/LIDC-IDRI/LIDC-IDRI-0010/01-01-2000-NA-NA-43375/3000518.000000-NA-66796] \\
        [--labels $NODULEMTL_CACHE/wholescan/LIDC-IDRI-0010/nodules_labels.nrrd] [--nodules 20]

The CT is a real whole LIDC scan read from its DICOM series (default LIDC-IDRI-0010, a
training patient: 277 x 512 x 512); the nodule masks are the real reference masks of that
scan (``nodules_labels.nrrd`` of the whole-scan cache), each nodule's box placed at
``--nodules`` disjoint positions spread over the grid (masks unchanged, positions moved).  The
result holds them as :class:`~NoduleMTLLib.core.consensus.MaskBox` (what the analysis stores), then
:func:`NoduleMTLLib.outputs.dicom_seg.write_dicom_seg` writes the SEG.

Printed: the CT's own array size; the time and the process's peak RSS growth during the write
(``ru_maxrss``), then the Python-heap peak of a second, traced write (``tracemalloc``: numpy
arrays included; not timed, tracing slows it several-fold).  Target (issue 24): under 1 GB above the CT's own memory
(the earlier code stacked one CT-sized mask per nodule: 8.4 s and a 3.35 GB peak, measured
by the issue on a 300 x 512 x 512 grid).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("NODULEMTL_CACHE", "/work/cache"))
DICOM = Path("/work/dicom/LIDC-IDRI/LIDC-IDRI-0010/01-01-2000-NA-NA-43375/3000518.000000-NA-66796")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def main() -> None:
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    from NoduleMTLLib.core.consensus import MaskBox
    from NoduleMTLLib.core.io import read_ct
    from NoduleMTLLib.core.results import AnalysisResult, NoduleResult
    from NoduleMTLLib.outputs.dicom_seg import write_dicom_seg

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dicom", type=Path, default=DICOM)
    ap.add_argument("--labels", type=Path, default=CACHE / "wholescan" / "LIDC-IDRI-0010" / "nodules_labels.nrrd")
    ap.add_argument("--nodules", type=int, default=20)
    args = ap.parse_args()

    ct = read_ct(args.dicom)
    shape = tuple(ct.shape_zyx)
    print(f"CT {args.dicom.name}: {shape} (z, y, x), {ct.array.dtype}, {ct.array.nbytes / 2**20:.0f} MiB; "
          f"peak RSS after reading it {_rss_mb():.0f} MiB")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(args.labels)))
    refs = [labels[sl] == v for v, sl in enumerate(ndi.find_objects(labels), start=1) if sl is not None]
    del labels
    print(f"{len(refs)} real nodule masks, boxes {[r.shape for r in refs]}")

    # disjoint positions on a coarse lattice over the grid, one reference mask each (in turn)
    cell = np.array([max(r.shape[a] for r in refs) + 2 for a in range(3)])
    lattice = [(z, y, x) for z in range(0, shape[0] - cell[0], cell[0]) for y in range(96, shape[1] - 96 - cell[1], cell[1])
               for x in range(96, shape[2] - 96 - cell[2], cell[2])]
    pick = np.linspace(0, len(lattice) - 1, args.nodules).round().astype(int)
    nodules = []
    for i, li in enumerate(pick, start=1):
        r = refs[(i - 1) % len(refs)]
        nodules.append(NoduleResult(id=i, point_lps_mm=(0.0, 0.0, 0.0), found=True,
                                    mask=MaskBox(tuple(int(v) for v in lattice[li]), r, shape),
                                    malignancy_probability=0.5))
    result = AnalysisResult(input=ct.describe(), run={"networks": []}, nodules=nodules)
    print(f"{len(nodules)} nodules spread over slices {min(n.mask_box.offset_zyx[0] for n in nodules)}-"
          f"{max(n.mask_box.offset_zyx[0] + n.mask_box.array.shape[0] for n in nodules)}")

    import highdicom  # noqa: F401  (imported before timing: its first import costs seconds)

    with tempfile.TemporaryDirectory() as tmp:
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        path = write_dicom_seg(result, ct, args.dicom, Path(tmp) / "segmentation.dcm")
        dt = time.perf_counter() - t0
        grow = _rss_mb() - rss0
        size = path.stat().st_size
        # second write, traced (tracemalloc slows allocation-heavy code several-fold: not timed)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        write_dicom_seg(result, ct, args.dicom, Path(tmp) / "segmentation2.dcm")
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    print(f"write_dicom_seg: {dt:.1f} s (untraced), file {size / 2**20:.1f} MiB")
    print(f"  peak RSS growth during the write: {grow:.0f} MiB (ru_maxrss)")
    print(f"  traced heap peak above what was allocated before: {peak / 2**20:.0f} MiB (tracemalloc, second write)")
    print(f"target < 1024 MiB above the CT: {'met' if max(peak / 2**20, grow) < 1024 else 'NOT met'}")

if __name__ == "__main__":
    main()
