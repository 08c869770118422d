"""How the 8-bit ``lidc_slices`` PNGs relate to HU (``python -m training.calibrate_slices``).

For a random sample of ``lidc_vois`` nodules (HU), the VOI's middle axial slice is located
in the same patient's PNG slices by normalised cross-correlation (``skimage.feature.
match_template``, same native pixel spacing), then PNG = a * HU + b is fitted on the
unsaturated pixels.  Prints the match quality and the HU that map to grey levels 0 and
255.  Finding (seed 0, 120 VOIs): NCC ~ 0.9998, HU(0) = -1024 median (range -3024 to
-896: the source slice minimum, padding included), HU(255) = 436 to 3073 (the source
slice maximum): each PNG is a min-max normalisation of its whole 512 x 512 source slice.
Hence ``NoduleMTLLib.inference.preprocessing.normalize_slices`` (affine-invariant) is used for
training and inference alike.
"""

from __future__ import annotations

import collections
import csv

import numpy as np
import SimpleITK as sitk
from PIL import Image
from skimage.feature import match_template

from training.data import default_data_dir


def locate_in_pngs(template: np.ndarray, stacks) -> tuple[float, object, int, tuple[int, int]] | None:
    """Where a 2D HU patch lies among ``lidc_slices`` PNG stacks, by normalised
    cross-correlation (``skimage.feature.match_template``; both at the source's pixel spacing).

    Args:
        template: (h, w) HU, h and w <= 128.
        stacks: iterable of (key, (S, 128, 128) float grey-level stack).

    Returns:
        (NCC, key, slice index, (row, column) of the patch's top-left corner) of the best
        match, or None when ``stacks`` is empty.
    """
    best = None
    for key, im in stacks:
        for k in range(len(im)):
            c = match_template(im[k], template)
            i = np.unravel_index(int(c.argmax()), c.shape)
            if best is None or c[i] > best[0]:
                best = (float(c[i]), key, k, (int(i[0]), int(i[1])))
    return best


def main(n: int = 120, seed: int = 0):
    d = default_data_dir()
    slices = list(csv.DictReader(open(d / "lidc_slices" / "labels.csv")))
    vois = list(csv.DictReader(open(d / "lidc_vois" / "labels.csv")))
    by_patient = collections.defaultdict(list)
    for r in slices:
        by_patient[r["patient_id"]].append(r)
    rng = np.random.default_rng(seed)
    res = []
    for r in rng.permutation(vois)[:n]:
        t = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "lidc_vois" / r["image"]))).astype(np.float32)
        t = t[t.shape[0] // 2]
        if t.std() < 1 or max(t.shape) > 128:
            continue
        stacks = [np.array(Image.open(d / "lidc_slices" / s["image_file"])).reshape(-1, 128, 128).astype(np.float32)
                  for s in by_patient[r["patient_id"]]]
        best = locate_in_pngs(t, enumerate(stacks))
        if best is None or best[0] < 0.9:
            continue
        _, j, k, (y, x) = best
        sl = stacks[j][k]
        p = sl[y:y + t.shape[0], x:x + t.shape[1]]
        ok = (p > 2) & (p < 253)
        if ok.sum() < 50:
            continue
        a, b = np.polyfit(t[ok], p[ok], 1)
        res.append((best[0], -b / a, (255 - b) / a))
    res = np.array(res)
    print(f"matched {len(res)} VOIs; NCC median {np.median(res[:, 0]):.5f}, 5th percentile {np.percentile(res[:, 0], 5):.5f}")
    print("HU mapped to grey 0   (percentiles 0/5/25/50/75/95/100):", np.percentile(res[:, 1], [0, 5, 25, 50, 75, 95, 100]).round())
    print("HU mapped to grey 255 (percentiles 0/5/25/50/75/95/100):", np.percentile(res[:, 2], [0, 5, 25, 50, 75, 95, 100]).round())


if __name__ == "__main__":
    main()
