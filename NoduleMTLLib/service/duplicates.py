"""One nodule, one answer: clicks that land on an already segmented nodule are merged into it.

Rule (:func:`merge_duplicate_clicks`, run by the analysis service on the click path before the
Lung-RADS / Brock assessment, so Brock counts distinct nodules): clicks are taken in order; a
later click is the SAME nodule as an earlier kept one when

* its point lies inside the earlier nodule's mask (the same nodule clicked twice, or 0.5 mm
  apart), or the earlier point lies inside its mask, or
* the two masks overlap by at least :data:`OVERLAP_FRACTION` of the smaller one (two clicks
  within one outline).

The later nodule is then dropped (whether or not it was segmented); the kept one keeps its id and
gets a note naming the merged click, and the run gets a note (``nodules.json`` ``messages``,
the CLI's ``note:`` lines).  Ids are not renumbered: nodule ``k`` is still the ``k``-th click,
and ``labels.nrrd``, ``nodules.json`` and ``nodules.csv`` hold the same set of ids.
"""

from __future__ import annotations

import numpy as np

#: Overlap (voxels in both / voxels of the smaller mask) at and above which two masks are one nodule.
OVERLAP_FRACTION = 0.5


def _contains(box, kji) -> bool:
    """Whether the voxel (k, j, i) is set in the :class:`~NoduleMTLLib.core.consensus.MaskBox` ``box``."""
    if box is None:
        return False
    rel = [int(v) - int(o) for v, o in zip(kji, box.offset_zyx)]
    if any(r < 0 or r >= s for r, s in zip(rel, box.array.shape)):
        return False
    return bool(box.array[tuple(rel)])


def _overlap(a, b) -> int:
    """Voxels set in both MaskBoxes (same grid)."""
    lo = [max(oa, ob) for oa, ob in zip(a.offset_zyx, b.offset_zyx)]
    hi = [min(oa + sa, ob + sb) for oa, sa, ob, sb in zip(a.offset_zyx, a.array.shape, b.offset_zyx, b.array.shape)]
    if any(h <= low for low, h in zip(lo, hi)):
        return 0
    sa = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, a.offset_zyx))
    sb = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, b.offset_zyx))
    return int(np.count_nonzero(a.array[sa] & b.array[sb]))


def _voxel(ct, point_lps) -> tuple[int, int, int]:
    i, j, k = (int(round(float(v))) for v in ct.world_lps_to_index(point_lps))
    return (k, j, i)


def same_nodule(earlier, later, ct) -> bool:
    """Whether two :class:`~NoduleMTLLib.core.results.NoduleResult` of one CT are the same nodule (module rule)."""
    a = earlier.mask_box if earlier.found else None
    b = later.mask_box if later.found else None
    if _contains(a, _voxel(ct, later.point_lps_mm)) or _contains(b, _voxel(ct, earlier.point_lps_mm)):
        return True
    if a is None or b is None:
        return False
    small = min(int(np.count_nonzero(a.array)), int(np.count_nonzero(b.array)))
    return small > 0 and _overlap(a, b) >= OVERLAP_FRACTION * small


def merge_duplicate_clicks(result, ct) -> list[tuple[int, int]]:
    """Merge the clicks of ``result`` (click path) that are the same nodule (module docstring), in place.

    Args:
        result: :class:`~NoduleMTLLib.core.results.AnalysisResult` (masks on ``ct``'s grid).
        ct: :class:`~NoduleMTLLib.core.io.CTVolume`.

    Returns:
        ``[(dropped id, kept id), ...]``.
    """
    kept, merged = [], []
    for n in result.nodules:
        into = next((k for k in kept if k.found and same_nodule(k, n, ct)), None)
        if into is None:
            kept.append(n)
            continue
        merged.append((n.id, into.id))
        x, y, z = n.point_ras_mm
        note = f"also clicked as nodule {n.id} at RAS ({x:.1f}, {y:.1f}, {z:.1f}) mm: the same nodule, reported once"
        into.message = f"{into.message}; {note}" if into.message else note
    if merged:
        result.nodules[:] = kept
        result.messages.append("Clicks on the same nodule were merged: " + ", ".join(
            f"click {d} into nodule {k}" for d, k in merged) + " (one nodule, one answer; ids are the click order)")
    return merged
