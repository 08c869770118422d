"""CT input: reading, validation and geometry (LPS internally, RAS at the Slicer boundary).

Supported inputs (all through SimpleITK): NRRD (``.nrrd``/``.nhdr``), NIfTI
(``.nii``/``.nii.gz``), MetaImage (``.mha``/``.mhd``) and DICOM series folders.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: HU range a CT volume must be compatible with.  Air is -1000 HU; scanners pad
#: outside the field of view with values down to -3024; bone/metal reach +3000 or more.
CT_MIN_PLAUSIBLE_HU = -3100.0
CT_MAX_PLAUSIBLE_HU = 40000.0

log = logging.getLogger(__name__)


from .errors import InputError  # noqa: E402,F401 - defined in errors.py (the one root), importable here


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with its world geometry.

    Attributes:
        image: SimpleITK image, pixel type float32 or int16 (HU), geometry in LPS
            (origin mm, spacing mm, direction cosines), as SimpleITK reads it.
        source: path it came from ("" for in-memory volumes).
        dicom_series_uid: SeriesInstanceUID when read from a DICOM series, else None.
        modality: DICOM Modality (0008,0060) when the input carries it (DICOM), else None.
        non_ct_allowed: True when a non-CT input was accepted with ``--allow-non-ct``
            (:func:`check_modality`); recorded in ``nodules.json`` (``input.non_ct_allowed``).
    """

    image: sitk.Image
    source: str = ""
    dicom_series_uid: str | None = None
    modality: str | None = None
    non_ct_allowed: bool = False

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
            **({"modality": self.modality} if self.modality is not None else {}),
            **({"non_ct_allowed": True} if self.non_ct_allowed else {}),
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


@contextmanager
def native_stderr_to_log(lines: list | None = None):
    """Route what ITK, GDCM and MetaIO print on the process's stderr (file descriptor 2) during
    the block into this module's log (level INFO), not the user's terminal; the captured lines
    are also appended to ``lines``.  Without a usable descriptor 2 (e.g. a GUI process) nothing
    is redirected."""
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield lines if lines is not None else []
        return
    out = lines if lines is not None else []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for ln in tmp.read().decode(errors="replace").splitlines():
                if ln.strip():
                    out.append(ln.strip())
                    log.info("ITK: %s", ln.strip())


def _nifti_expected_bytes(path: Path) -> tuple[int, int, int]:
    """(vox_offset, bytes per slice, slices) that a NIfTI file's header declares (read by ITK)."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    meta = {k: r.GetMetaData(k) for k in r.GetMetaDataKeys()}
    ndim = int(meta["dim[0]"])
    dims = [int(meta[f"dim[{i}]"]) for i in range(1, ndim + 1)]
    per_voxel = int(meta["bitpix"]) // 8
    per_slice = per_voxel * int(np.prod(dims[:2])) * int(np.prod(dims[3:]) if len(dims) > 3 else 1)
    return int(float(meta["vox_offset"])), per_slice, dims[2] if len(dims) > 2 else 1


def _gzip_data_bytes(path: Path, wanted: int) -> int:
    """Bytes a gzip file decompresses to, counted up to ``wanted`` (a truncated or corrupt
    stream counts what it yields before the damage).  The gzip trailer's size field answers
    without decompressing when it matches ``wanted``."""
    import zlib

    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == wanted % 2**32:
            return wanted
    n = 0
    z = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    try:
        with open(path, "rb") as f:
            while n < wanted:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                n += len(z.decompress(chunk))
    except zlib.error:
        pass
    return n


def check_data_complete(path: str | os.PathLike) -> None:
    """Check that an image file holds all the voxel data its header declares.

    NIfTI (``.nii``, ``.nii.gz``): ITK reads missing data of a truncated file (or of a header
    declaring more slices than the file holds) as zeros, so the file size (uncompressed) or the
    decompressed size (gzip) is compared with ``vox_offset`` + voxels x ``bitpix`` / 8.  NRRD and
    MetaImage need no check here: ITK already refuses their incomplete data.

    Raises:
        InputError: the data is incomplete (the message gives the slices present and declared).
    """
    p = Path(path)
    low = p.name.lower()
    if not (low.endswith(".nii") or low.endswith(".nii.gz")):
        return
    try:
        offset, per_slice, slices = _nifti_expected_bytes(p)
    except (RuntimeError, KeyError, ValueError):
        return  # ITK read it; no NIfTI header fields to check against
    expected = offset + per_slice * slices
    got = _gzip_data_bytes(p, expected) if low.endswith(".gz") else p.stat().st_size
    if got < expected:
        have = max(0, got - offset) / per_slice if per_slice else 0
        holds = "decompresses to" if low.endswith(".gz") else "holds"
        raise InputError(f"{p} is incomplete: its header declares {slices} slices ({expected} bytes) but the file "
                         f"{holds} {got} bytes, data for {have:.1f} slices (truncated file, or a header declaring "
                         "more slices than the data)")


def check_slice_positions(positions_lps, orientation) -> None:
    """Check that DICOM slices are evenly spaced along the slice normal with none missing.

    Args:
        positions_lps: ImagePositionPatient (mm) of each slice of the series.
        orientation: ImageOrientationPatient (row and column direction cosines, 6 numbers).

    Raises:
        InputError: two slices at the same position, a gap of a whole number of slice spacings
            ("slice 15 of 30 is missing or unreadable (gap of 16 mm between z=184 and z=200)"),
            or otherwise uneven spacing.  The tolerance is 10 % of the median spacing (at least
            0.01 mm); z is the position along the normal in mm.
    """
    pos = np.asarray(positions_lps, dtype=float).reshape(-1, 3)
    if len(pos) < 2:
        return
    o = np.asarray(orientation, dtype=float).ravel()
    normal = np.cross(o[:3], o[3:6])
    z = np.sort(pos @ normal)
    d = np.diff(z)
    step = float(np.median(d))
    tol = max(0.01, 0.1 * abs(step))
    for i, di in enumerate(d):
        if di <= tol:
            raise InputError(f"DICOM series: slices {i + 1} and {i + 2} of {len(z)} lie at the same position "
                             f"(z={z[i]:g} mm): duplicate or mixed series")
    if step <= tol:
        return
    missing = np.rint(d / step).astype(int) - 1
    total = len(z) + int(missing[missing > 0].sum())
    for i, di in enumerate(d):
        k = int(round(di / step))
        if abs(di - k * step) > tol:
            raise InputError(f"DICOM series: slice spacing is not uniform ({di:g} mm between z={z[i]:g} and "
                             f"z={z[i + 1]:g}, {step:g} mm between the other slices)")
        if k > 1:
            first = i + 2
            which = f"slice {first}" if k == 2 else f"slices {first}-{first + k - 2}"
            verb = "is" if k == 2 else "are"
            raise InputError(f"DICOM series: {which} of {total} {verb} missing or unreadable (gap of {di:g} mm "
                             f"between z={z[i]:g} and z={z[i + 1]:g}; the other slices are {step:g} mm apart)")


#: DICOM SOP classes of CT images: CT, Enhanced CT, Legacy Converted Enhanced CT Image Storage.
CT_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.2": "CT Image Storage", "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
                  "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage"}
#: Names of common non-CT SOP classes, for the error message.
OTHER_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.4": "MR Image Storage", "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
                     "1.2.840.10008.5.1.4.1.1.128": "PET Image Storage", "1.2.840.10008.5.1.4.1.1.20": "NM Image Storage",
                     "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
                     "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage", "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage",
                     "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage"}


def check_modality(source, modality: str | None, sop_class_uid: str | None, allow_non_ct: bool = False) -> bool:
    """Refuse what is not a CT: a DICOM Modality (0008,0060) other than ``CT`` or a SOP class
    (0008,0016) other than :data:`CT_SOP_CLASSES`.  Inputs without these tags (NRRD, NIfTI,
    MetaImage) are not judged here (:func:`validate_ct` checks their values).

    Returns:
        True when the input is not a CT and ``allow_non_ct`` accepted it (to be recorded).

    Raises:
        NotCTError: not a CT and not ``allow_non_ct`` (the message names both tags).
    """
    from .errors import NotCTError

    mod = (modality or "").strip().upper() or None
    sop = (sop_class_uid or "").strip().rstrip("\x00") or None
    bad_mod = mod is not None and mod != "CT"
    bad_sop = sop is not None and sop not in CT_SOP_CLASSES
    if not (bad_mod or bad_sop):
        return False
    if allow_non_ct:
        log.warning("%s is not a CT (Modality %s, SOP class %s): analysed because of --allow-non-ct", source, mod, sop)
        return True
    sop_name = OTHER_SOP_CLASSES.get(sop or "", sop)
    raise NotCTError(f"{source} is not a CT: Modality {mod or '(none)'}, SOP class {sop_name or '(none)'}. NoduleMTL "
                     "analyses chest CT only (--allow-non-ct for phantoms or tests)")


def _read_series(folder: Path):
    """Read the one DICOM series in ``folder`` and check its slice positions.
    Returns (image, SeriesInstanceUID, Modality, SOPClassUID)."""
    reader = sitk.ImageSeriesReader()
    uids = reader.GetGDCMSeriesIDs(str(folder))
    if not uids:
        raise InputError(f"No DICOM series found in folder {folder}")
    if len(uids) > 1:
        raise InputError(f"Folder {folder} holds {len(uids)} DICOM series; point to a folder with exactly one")
    files = reader.GetGDCMSeriesFileNames(str(folder), uids[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    try:
        pos = [[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(len(files))]
        ori = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
    except (RuntimeError, ValueError):
        pos = ori = None  # no ImagePositionPatient / ImageOrientationPatient: nothing to check against
    if pos is not None and len(ori) == 6:
        check_slice_positions(pos, ori)
    tags = [reader.GetMetaData(0, t) if reader.HasMetaDataKey(0, t) else None for t in ("0008|0060", "0008|0016")]
    return image, uids[0], *tags


def read_ct(path: str | os.PathLike, allow_non_ct: bool = False) -> CTVolume:
    """Read and validate a CT volume.

    Args:
        path: an image file (NRRD, NIfTI, MetaImage, or a single DICOM file of a
            multi-frame volume) or a folder holding one DICOM series.

    Returns:
        :class:`CTVolume` in HU with LPS geometry.

    Raises:
        InputError: missing path, unreadable file, incomplete voxel data
            (:func:`check_data_complete`), no/multiple DICOM series, missing or unevenly
            spaced DICOM slices (:func:`check_slice_positions`), not 3D, more than one
            component, or values that are not CT (see :func:`validate_ct`).  What ITK prints
            while reading goes to the log (:func:`native_stderr_to_log`), not the terminal.
        NotCTError: a DICOM input whose Modality or SOP class is not CT, unless
            ``allow_non_ct`` (:func:`check_modality`; then ``non_ct_allowed`` is recorded).
    """
    p = Path(path)
    modality = sop = None
    if not p.exists():
        raise InputError(f"Input not found: {p}")
    series_uid = None
    printed: list[str] = []
    try:
        with native_stderr_to_log(printed):
            if p.is_dir():
                image, series_uid, modality, sop = _read_series(p)
            else:
                image = sitk.ReadImage(str(p))
                check_data_complete(p)
                modality, sop = (image.GetMetaData(t) if image.HasMetaDataKey(t) else None for t in ("0008|0060", "0008|0016"))
    except InputError:
        raise
    except RuntimeError as e:  # SimpleITK raises RuntimeError on unreadable input
        detail = [ln for ln in printed if "not read completely" in ln or "ideal =" in ln]
        reason = " ".join(" ".join(detail).split()) if detail else _itk_reason(e)
        m = re.search(r"ideal = (\d+) : actual = (\d+)", reason)
        if m:  # MetaIO: the exception itself only says "No such file or directory"
            reason = f"data incomplete: {m.group(1)} bytes expected, {m.group(2)} read (truncated file?)"
        raise InputError(f"Cannot read {p}: {reason}") from None
    allowed = check_modality(p, modality, sop, allow_non_ct)
    ct = CTVolume(image=image, source=str(p), dicom_series_uid=series_uid,
                  modality=modality.strip() if modality else None, non_ct_allowed=allowed)
    validate_ct(ct)
    return ct


def validate_ct(ct: CTVolume) -> None:
    """Check that a volume is a 3D CT in HU.

    Raises:
        InputError: not 3D (or a single slice), vector/multi-component pixels, a voxel that
            is NaN or infinite, a label map (few distinct integer values), or a value range incompatible
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
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            k, j, i = (int(v) for v in np.argwhere(bad)[0])
            raise InputError(f"Input has {int(bad.sum())} voxels that are not numbers (NaN or infinite), the first at "
                             f"voxel (i, j, k) = ({i}, {j}, {k}); a CT holds a Hounsfield value in every voxel")
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
