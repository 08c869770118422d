"""Nodule masks given by the user (``nodulemtl reclassify --mask``): read, checked against the
CT's grid, multi-label masks split into one nodule per label value.

Rules (``docs/outputs.md``, *Re-classify*):

* A mask must lie on the CT's grid: the same size, spacing, origin and direction (within
  :data:`SPACING_RTOL`, :data:`ORIGIN_TOL_VOXELS` of a voxel and :data:`DIRECTION_ATOL`).
  Only the same shape is not enough: a mask shifted or rescaled is refused with the numbers.
* A mask with ONE non-zero value (0/1, 0/255, ...) is one nodule (id from ``--id``, else 1..N).
* A mask with SEVERAL non-zero values (e.g. ``analyze``'s own ``labels.nrrd``) is split by
  value: one nodule per label, the label value kept as the nodule id.  ``--id`` and
  ``--point`` cannot be combined with such a mask (its values are the ids; the points
  default to each nodule's centroid).  An id given twice is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .errors import InputError

#: Relative tolerance of the mask's spacing against the CT's.
SPACING_RTOL = 1e-3
#: Tolerance of the mask's origin, as a fraction of the CT's smallest voxel spacing.
ORIGIN_TOL_VOXELS = 0.01
#: Absolute tolerance of the direction cosines.
DIRECTION_ATOL = 1e-3


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def check_same_grid(image, ct, name: str) -> None:
    """Check that the SimpleITK ``image`` lies on the grid of ``ct`` (:class:`NoduleMTLLib.core.io.CTVolume`).

    Raises:
        InputError: size, spacing (mm), origin (LPS mm) or direction differ; the message gives
            both values and how to fix it.
    """
    cimg = ct.image
    what = []
    if tuple(image.GetSize()) != tuple(cimg.GetSize()):
        what.append(f"size {_fmt(image.GetSize())}, the CT {_fmt(cimg.GetSize())}")
    sp, csp = np.asarray(image.GetSpacing()), np.asarray(cimg.GetSpacing())
    if not np.allclose(sp, csp, rtol=SPACING_RTOL, atol=1e-6):
        what.append(f"spacing {_fmt(sp)} mm, the CT {_fmt(csp)} mm")
    o, co = np.asarray(image.GetOrigin()), np.asarray(cimg.GetOrigin())
    if np.linalg.norm(o - co) > ORIGIN_TOL_VOXELS * float(csp.min()) + 1e-4:
        what.append(f"origin {_fmt(np.round(o, 3))} mm, the CT {_fmt(np.round(co, 3))} mm (LPS)")
    d, cd = np.asarray(image.GetDirection()), np.asarray(cimg.GetDirection())
    if d.shape != cd.shape or not np.allclose(d, cd, atol=DIRECTION_ATOL):
        what.append(f"direction {_fmt(np.round(d, 4))}, the CT {_fmt(np.round(cd, 4))}")
    if what:
        raise InputError(f"Mask {name} is not on the CT's grid: {'; '.join(what)}. Resample it onto the CT "
                         "(e.g. Slicer's 'Resample Scalar/Vector/DWI Volume' with the CT as reference)")


def read_masks(paths: Sequence[str | os.PathLike], ct, nodule_ids: Sequence[int] | None = None,
               points_lps: Sequence | None = None) -> tuple[list[np.ndarray], list[int] | None, list | None]:
    """Read nodule masks for :func:`NoduleMTLLib.service.analysis.reclassify` (see the module docstring).

    Args:
        paths: mask image files (any SimpleITK format), each on the CT's grid.
        ct: the CT (:class:`NoduleMTLLib.core.io.CTVolume`).
        nodule_ids: ``--id`` values, one per path, or None.
        points_lps: ``--point`` values (world LPS mm), one per path, or None.

    Returns:
        ``(masks, ids, points)``: bool (z, y, x) arrays of ``ct.shape_zyx``, one per nodule;
        the nodule ids (None: the default 1..N); the points (None: the centroids).

    Raises:
        InputError: a file cannot be read, is not a 3D single-component image, is off the CT's
            grid (:func:`check_same_grid`), has non-integer labels, is empty; ``--id`` /
            ``--point`` with a multi-label mask; an id given twice.
    """
    import SimpleITK as sitk

    from .io import native_stderr_to_log

    masks: list[np.ndarray] = []
    ids: list[int] = []
    split_any = False
    for k, path in enumerate(paths):
        try:
            with native_stderr_to_log():
                img = sitk.ReadImage(str(path))
        except RuntimeError as e:
            raise InputError(f"Cannot read mask {path}: {' '.join(str(e).split())[-200:]}") from None
        if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"Mask {path} is not a 3D label image ({img.GetDimension()}D, "
                             f"{img.GetNumberOfComponentsPerPixel()} components per voxel)")
        check_same_grid(img, ct, str(path))
        arr = sitk.GetArrayFromImage(img)
        values = np.unique(arr[arr != 0])
        if values.size == 0:
            raise InputError(f"Mask {path} is empty (no non-zero voxel)")
        if values.size == 1:
            masks.append(arr != 0)
            ids.append(int(nodule_ids[k]) if nodule_ids is not None and k < len(nodule_ids) else len(ids) + 1)
            continue
        if not np.all(np.equal(np.mod(values, 1), 0)) or values.min() < 1 or values.max() > 65535:
            raise InputError(f"Mask {path} has {values.size} different values that are not label numbers 1..65535 "
                             f"(e.g. {values[0]:g}); give a binary mask or a label map")
        if nodule_ids is not None or points_lps is not None:
            raise InputError(f"Mask {path} holds {values.size} labels ({', '.join(str(int(v)) for v in values[:10])}): "
                             "its label values are the nodule ids; --id and --point cannot be given with it")
        split_any = True
        for v in values:
            masks.append(arr == v)
            ids.append(int(v))
    dup = sorted({i for i in ids if ids.count(i) > 1}) if split_any else []
    if dup:
        raise InputError(f"Nodule id {', '.join(map(str, dup))} given twice (--id or label values of the masks)")
    points = list(points_lps) if points_lps is not None else None
    if not split_any:  # binary masks: ids as given (their count is checked by the service) or 1..N
        return masks, list(nodule_ids) if nodule_ids is not None else None, points
    return masks, ids, points
