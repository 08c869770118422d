"""CT input: reading, validation and geometry (LPS internally, RAS at the Slicer boundary).

Supported inputs (all through SimpleITK): NRRD (``.nrrd``/``.nhdr``), NIfTI
(``.nii``/``.nii.gz``), MetaImage (``.mha``/``.mhd``) and DICOM series folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: HU range a CT volume must be compatible with.  Air is -1000 HU; scanners pad
#: outside the field of view with values down to -3024; bone/metal reach +3000 or more.
CT_MIN_PLAUSIBLE_HU = -3100.0
CT_MAX_PLAUSIBLE_HU = 40000.0


class InputError(ValueError):
    """The input is not something NoduleMTL can analyse (message says why)."""


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with its world geometry.

    Attributes:
        image: SimpleITK image, pixel type float32 or int16 (HU), geometry in LPS
            (origin mm, spacing mm, direction cosines), as SimpleITK reads it.
        source: path it came from ("" for in-memory volumes).
        dicom_series_uid: SeriesInstanceUID when read from a DICOM series, else None.
    """

    image: sitk.Image
    source: str = ""
    dicom_series_uid: str | None = None

    @property
    def array(self) -> np.ndarray:
        """HU voxels as a numpy view, shape (z, y, x) = (k, j, i)."""
        return sitk.GetArrayViewFromImage(self.image)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        i, j, k = self.image.GetSize()
        return (k, j, i)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (i, j, k) in mm."""
        return tuple(self.image.GetSpacing())

    def world_lps_to_index(self, point_lps) -> np.ndarray:
        """Continuous voxel index (i, j, k) of a world LPS point (mm)."""
        return np.asarray(self.image.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps]))

    def contains_lps(self, point_lps, margin_voxels: float = 0.5) -> bool:
        """True if the world LPS point lies inside the volume's voxel extent."""
        idx = self.world_lps_to_index(point_lps)
        size = np.asarray(self.image.GetSize())
        return bool(np.all(idx >= -margin_voxels) and np.all(idx <= size - 1 + margin_voxels))

    def describe(self) -> dict:
        """JSON-ready description of the input geometry."""
        return {
            "path": self.source,
            "size_ijk": list(self.image.GetSize()),
            "spacing_mm": [round(v, 6) for v in self.image.GetSpacing()],
            "origin_lps_mm": [round(v, 6) for v in self.image.GetOrigin()],
            "direction": [round(v, 9) for v in self.image.GetDirection()],
            "dicom_series_uid": self.dicom_series_uid,
        }


def lps_to_ras(point) -> tuple[float, float, float]:
    """World LPS mm -> RAS mm (negate x and y)."""
    x, y, z = (float(v) for v in point)
    return (-x, -y, z)


ras_to_lps = lps_to_ras  # the same sign flip, both ways


def ijk_to_lps_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 homogeneous matrix mapping voxel index (i, j, k) to world LPS mm."""
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def ijk_to_ras_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 homogeneous matrix mapping voxel index (i, j, k) to world RAS mm (Slicer's IJKToRAS)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps_matrix(image)


def image_from_array(array_zyx: np.ndarray, ijk_to_lps: np.ndarray) -> sitk.Image:
    """SimpleITK image from a numpy array (z, y, x) and a 4x4 IJK->LPS matrix.

    Raises:
        InputError: if the matrix is singular.
    """
    m = np.asarray(ijk_to_lps, dtype=float)
    lin = m[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0):
        raise InputError("IJK-to-world matrix has a zero-length axis")
    direction = lin / spacing
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in m[:3, 3]])
    img.SetDirection([float(v) for v in direction.ravel()])
    return img


def _itk_reason(e: BaseException) -> str:
    """One line from a SimpleITK/ITK exception: its last line that is not a source location
    (e.g. "_nrrdEncodingGzip_read: expected 3379200 bytes but received 1457510")."""
    import re

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not re.search(r"\.(cxx|cpp|h|hxx):\d+:?$", ln) and not ln.endswith(":")]
    line = (useful or lines or [type(e).__name__])[-1]
    return re.sub(r"^(\[\w+\]\s*|sitk::ERROR:\s*|ITK ERROR:\s*)+", "", line)


def read_ct(path: str | os.PathLike) -> CTVolume:
    """Read and validate a CT volume.

    Args:
        path: an image file (NRRD, NIfTI, MetaImage, or a single DICOM file of a
            multi-frame volume) or a folder holding one DICOM series.

    Returns:
        :class:`CTVolume` in HU with LPS geometry.

    Raises:
        InputError: missing path, unreadable file, no/multiple DICOM series,
            not 3D, more than one component, or values that are not CT (see :func:`validate_ct`).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"Input not found: {p}")
    series_uid = None
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            uids = reader.GetGDCMSeriesIDs(str(p))
            if not uids:
                raise InputError(f"No DICOM series found in folder {p}")
            if len(uids) > 1:
                raise InputError(f"Folder {p} holds {len(uids)} DICOM series; point to a folder with exactly one")
            series_uid = uids[0]
            files = reader.GetGDCMSeriesFileNames(str(p), series_uid)
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(p))
    except InputError:
        raise
    except RuntimeError as e:  # SimpleITK raises RuntimeError on unreadable input
        raise InputError(f"Cannot read {p}: {_itk_reason(e)}") from None
    ct = CTVolume(image=image, source=str(p), dicom_series_uid=series_uid)
    validate_ct(ct)
    return ct


def validate_ct(ct: CTVolume) -> None:
    """Check that a volume is a 3D CT in HU.

    Raises:
        InputError: not 3D (or a single slice), vector/multi-component pixels, a
            label map (few distinct integer values), or a value range incompatible
            with HU (no voxel below -500 HU, i.e. no air/lung, or values outside
            [-3100, 40000]).
    """
    img = ct.image
    if img.GetDimension() != 3:
        raise InputError(f"Input is {img.GetDimension()}D; a 3D CT volume is required")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("Input has multi-component (e.g. RGB) pixels; a CT volume has one HU value per voxel")
    size = img.GetSize()
    if min(size) < 2:
        raise InputError(f"Input has size {size}: a single slice is 2D; a 3D CT volume is required")
    arr = sitk.GetArrayViewFromImage(img)
    step = max(1, int(round((arr.size / 2_000_000) ** (1 / 3))))
    sample = np.asarray(arr[::step, ::step, ::step])
    lo, hi = float(sample.min()), float(sample.max())
    if lo < CT_MIN_PLAUSIBLE_HU or hi > CT_MAX_PLAUSIBLE_HU:
        raise InputError(f"Input values [{lo:g}, {hi:g}] are not Hounsfield units of a CT")
    if lo >= 0 and np.issubdtype(sample.dtype, np.integer) and len(np.unique(sample)) <= 256:
        raise InputError("Input looks like a label map (non-negative integers, few distinct values), not a CT volume in HU")
    if lo > -500:
        raise InputError(
            f"Input has no voxel below {lo:g}; a chest CT in HU contains air and lung (< -500 HU). "
            "Is this a CT in Hounsfield units?"
        )


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write an image through a temporary file in the same folder, then rename (no partial file)."""
    p = Path(path)
    tmp = p.with_name(".tmp-" + p.name)  # keeps the extension, so SimpleITK picks the right writer
    sitk.WriteImage(image, str(tmp), compress)
    os.replace(tmp, p)
