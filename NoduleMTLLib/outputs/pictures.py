"""Key images of every nodule: ``pictures/nodule_<id>.png``.

One PNG per found nodule: axial view of the mask's largest cross-section, coronal and sagittal
views through that cross-section's centroid, at a
lung window (level -600 HU, width 1500 HU), the mask's outline in yellow, a 10 mm scale bar
(20 mm for fields of view over 100 mm) in each view, and a header with the key figures
(long x short axis, Lung-RADS mean diameter, volume, type, Lung-RADS category, networks'
and Brock probabilities).  Drawn with Pillow (a runtime dependency, no matplotlib): 0.16 s
for the 6 cm A0002 mass (150 mm field of view) on the busy 2-core development machine, less
for small nodules; the 100 candidates of a whole-scan search cost several seconds
(``--no-pictures`` skips them).

Views are square fields of view of ``max(40 mm, 2.5 x long axis)`` resampled to square
display pixels (mm per pixel the same both ways), in the CT's voxel axes: the directions of
an axial chest CT (no oblique reformatting).  Axial: patient right on the image's left
(radiological convention) when the CT's i axis points to patient left; coronal and
sagittal: superior at the top.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

#: Lung window (level, width) in HU.
LUNG_WINDOW = (-600.0, 1500.0)
#: Display size of each view (pixels).
VIEW_PX = 256
#: Smallest field of view (mm) and multiple of the long axis.
MIN_FOV_MM = 40.0
FOV_PER_DIAMETER = 2.5
from ..core.filenames import PICTURES_DIR, picture_file  # noqa: E402,F401  (the names live in one module)

HEADER_PX = 58
GAP_PX = 6
OUTLINE_RGB = (255, 220, 0)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _crop(arr: np.ndarray, centre, half, fill):
    """Box of ``arr`` (z, y, x) around ``centre`` (voxels) with half widths ``half``, padded with ``fill``."""
    out = np.full(tuple(2 * h + 1 for h in half), fill, dtype=arr.dtype)
    src, dst = [], []
    for c, h, n in zip(centre, half, arr.shape):
        a, b = c - h, c + h + 1
        sa, sb = max(a, 0), min(b, n)
        src.append(slice(sa, max(sa, sb)))
        dst.append(slice(sa - a, sa - a + max(0, sb - sa)))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _paste_clipped(box, lo, shape) -> np.ndarray:
    """The part of a MaskBox inside the window starting at ``lo`` (z, y, x; may lie outside the
    grid) of ``shape``, as a bool array of ``shape`` (False elsewhere)."""
    out = np.zeros(shape, bool)
    src, dst = [], []
    for o, n, low, s in zip(box.offset_zyx, box.array.shape, lo, shape):
        a, b = max(o, low), min(o + n, low + s)
        if b <= a:
            return out
        src.append(slice(a - o, b - o))
        dst.append(slice(a - low, b - low))
    out[tuple(dst)] = box.array[tuple(src)]
    return out


def _view(hu2d: np.ndarray, mask2d: np.ndarray, row_mm: float, col_mm: float, fov_mm: float, label: str):
    """One view: windowed HU with the mask outline and a scale bar, VIEW_PX square (PIL RGB image)."""
    from PIL import Image, ImageDraw

    level, width = LUNG_WINDOW
    g = np.clip((hu2d.astype(np.float32) - (level - width / 2)) / width, 0, 1) * 255
    img = Image.fromarray(g.astype(np.uint8), "L")
    # physical size of the crop -> square display pixels
    h_mm, w_mm = hu2d.shape[0] * row_mm, hu2d.shape[1] * col_mm
    scale = VIEW_PX / max(h_mm, w_mm)
    size = (max(1, int(round(w_mm * scale))), max(1, int(round(h_mm * scale))))
    img = img.resize(size, Image.BILINEAR).convert("RGB")
    m = np.asarray(Image.fromarray(mask2d.astype(np.uint8) * 255, "L").resize(size, Image.NEAREST)) > 127
    if m.any():
        from scipy import ndimage as ndi

        edge = m & ~ndi.binary_erosion(m, iterations=2)
        a = np.asarray(img).copy()
        a[edge] = OUTLINE_RGB
        img = Image.fromarray(a)
    canvas = Image.new("RGB", (VIEW_PX, VIEW_PX), (0, 0, 0))
    canvas.paste(img, ((VIEW_PX - size[0]) // 2, (VIEW_PX - size[1]) // 2))
    d = ImageDraw.Draw(canvas)
    bar_mm = 20.0 if fov_mm > 100 else 10.0
    bar_px = bar_mm * scale
    x0, y0 = 10, VIEW_PX - 14
    d.line([(x0, y0), (x0 + bar_px, y0)], fill=(255, 255, 255), width=3)
    d.text((x0, y0 - 18), f"{bar_mm:.0f} mm", fill=(255, 255, 255), font=_font(13), stroke_width=2, stroke_fill=(0, 0, 0))
    d.text((6, 4), label, fill=(255, 255, 255), font=_font(13), stroke_width=2, stroke_fill=(0, 0, 0))
    return canvas


def key_figures(nodule) -> list[str]:
    """Header lines of a nodule's picture (also used by the HTML report): the summary fields of
    :data:`NoduleMTLLib.outputs.fields.REPORTED_FIELDS` (measurements on the first line, the reported
    P(malignant), Lung-RADS and Brock on the second)."""
    from .fields import REPORTED_FIELDS, summary_line

    d = nodule.to_dict()
    sizes = [f for f in REPORTED_FIELDS if f.unit or f.key == "type"]
    line1 = f"{nodule.name}: " + summary_line(d, sizes)
    line2 = summary_line(d, [f for f in REPORTED_FIELDS if f not in sizes])
    br = getattr(nodule, "brock", None)
    if br and br.get("probability") is None:
        line2 += ("; " if line2 else "") + "Brock: incomplete (" + ", ".join(br.get("missing", [])) + " unknown)"
    elif br and br.get("lower_bound"):
        line2 += " (Brock lower bound)"
    return [line1, line2]


def nodule_picture(ct, nodule):
    """The picture of one found nodule as a PIL RGB image (see the module docstring).

    Args:
        ct: :class:`NoduleMTLLib.core.io.CTVolume` (HU); nodule: found
            :class:`NoduleMTLLib.core.results.NoduleResult` (mask on the CT grid).

    Raises:
        ValueError: the nodule was not found or has an empty mask.
    """
    from PIL import Image, ImageDraw

    mbox = nodule.mask_box if nodule.found else None
    if mbox is None:
        raise ValueError(f"{nodule.name} has no mask to draw")
    sx, sy, sz = ct.spacing
    box, sub = mbox.slices, mbox.array  # the mask's tight box: no CT-sized array
    # axial view: the slice with the largest cross-section (where the long axis is usually measured);
    # coronal / sagittal: through that cross-section's centroid
    kz = int(np.argmax(sub.reshape(sub.shape[0], -1).sum(1)))
    jy, ix = (int(round(v)) for v in np.argwhere(sub[kz]).mean(0))
    k, j, i = kz + box[0].start, jy + box[1].start, ix + box[2].start
    fov = max(MIN_FOV_MM, FOV_PER_DIAMETER * float(nodule.diameter_mm or 0.0))
    half = (int(np.ceil(fov / 2 / sz)), int(np.ceil(fov / 2 / sy)), int(np.ceil(fov / 2 / sx)))
    hu = _crop(np.asarray(ct.array), (k, j, i), half, np.int16(-1000) if ct.array.dtype == np.int16 else -1000.0)
    lo = (k - half[0], j - half[1], i - half[2])
    mk = _paste_clipped(mbox, lo, tuple(2 * h + 1 for h in half))
    d = np.asarray(ct.image.GetDirection()).reshape(3, 3)
    cz, cy, cx = half
    ax_hu, ax_m = hu[cz], mk[cz]                       # rows j, cols i
    co_hu, co_m = hu[:, cy, :], mk[:, cy, :]           # rows k, cols i
    sa_hu, sa_m = hu[:, :, cx], mk[:, :, cx]           # rows k, cols j
    if d[2, 2] > 0:  # k towards superior: put superior at the top
        co_hu, co_m, sa_hu, sa_m = co_hu[::-1], co_m[::-1], sa_hu[::-1], sa_m[::-1]
    views = [_view(ax_hu, ax_m, sy, sx, fov, "axial"), _view(co_hu, co_m, sz, sx, fov, "coronal"),
             _view(sa_hu, sa_m, sz, sy, fov, "sagittal")]
    w = 3 * VIEW_PX + 2 * GAP_PX
    out = Image.new("RGB", (w, HEADER_PX + VIEW_PX), (24, 24, 24))
    for n, v in enumerate(views):
        out.paste(v, (n * (VIEW_PX + GAP_PX), HEADER_PX))
    dr = ImageDraw.Draw(out)
    for n, line in enumerate(key_figures(nodule)):
        dr.text((8, 6 + 24 * n), line, fill=(255, 255, 255), font=_font(15))
    return out


def write_pictures(result, ct, out_dir) -> list[Path]:
    """Write ``out_dir/pictures/nodule_<id>.png`` for every found nodule into the staged output
    folder of :func:`NoduleMTLLib.outputs.writer.write_result_set` (a ``pictures`` folder already there
    is replaced, so pictures of other nodules do not linger).  Returns the paths.

    Raises:
        OSError: the folder cannot be written.
    """
    final = Path(out_dir) / PICTURES_DIR
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    paths = []
    for n in result.nodules:
        box = n.mask_box if n.found else None
        if box is not None:
            nodule_picture(ct, n).save(final / picture_file(n.id), optimize=False)
            paths.append(final / picture_file(n.id))
    return paths
