"""Reproduce the sample CT shipped in ``Resources/SampleData`` (``python -m training.make_sample``).

Source: LIDC-IDRI-0003 (TCIA, CC BY 3.0; Armato et al., Med. Phys. 2011), whole scan in
``../shared/data/whole_ct/lidc/LIDC-IDRI-0003``; a 176 x 200 x 48 voxel box
(0.82 x 0.82 x 2.5 mm) around nodules 1, 2 and 3 of that scan, with the readers' >= 50 %
consensus label map on the same grid.  LIDC-IDRI-0003 is in the test split of every
network (``training/splits/lidc_patient_split.json``).
"""


import SimpleITK as sitk

from training.data import REPO, default_data_dir

CENTER_LPS = (48.0, 15.0, -181.0)
SIZE = (176, 200, 48)


def main():
    src = default_data_dir() / "whole_ct" / "lidc" / "LIDC-IDRI-0003"
    out = REPO / "Resources" / "SampleData"
    out.mkdir(parents=True, exist_ok=True)
    ct = sitk.ReadImage(str(src / "ct.nrrd"))
    lab = sitk.ReadImage(str(src / "nodules_labels.nrrd"))
    c = ct.TransformPhysicalPointToIndex(CENTER_LPS)
    start = [max(0, min(int(ci - s // 2), n - s)) for ci, s, n in zip(c, SIZE, ct.GetSize())]
    for img, name in ((ct, "LIDC-IDRI-0003_crop.nrrd"), (lab, "LIDC-IDRI-0003_crop_labels.nrrd")):
        sitk.WriteImage(sitk.RegionOfInterest(img, SIZE, start), str(out / name), True)
    print("crop start index", start, "->", out)


if __name__ == "__main__":
    main()
