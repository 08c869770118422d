"""Cache of DSMT-Net's patch outputs on every HU VOI, for the clinical-rule studies (issue 22).

``python -m training.clinical_cache [--splits train,val,test]`` runs the default click network
(DSMT-Net, 3D HU click path, click at the labelled centre of every ``lidc_vois`` nodule, the
protocol of ``nodulemtl-train evaluate NETWORK --vois``) once and stores, per VOI, the
segmentation probability and slice logits of every patch the zoom ladder computed
(``$NODULEMTL_CACHE/clinical/<patient>_<nodule>.npz``, outside the repository).  Slices are
extended while the outermost slice holds a pixel above :data:`EXTEND_THRESHOLD` (lower than
any mask threshold studied), so :func:`replay` reproduces the click path's answer for any mask
threshold >= that value without running the network again.

LIDC-IDRI-0001 and -0009 are reserved and never read.  Training patients are cached too: the
nodule-type classifier is fitted on them (their network outputs are in-sample for DSMT-Net).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from training.data import default_data_dir, load_split
from training.wholescan import RESERVED as RESERVED_PATIENTS

NETWORK = "dsmtnet"
#: Slice-extension threshold of the cached patches (any replayed mask threshold must be >= this).
EXTEND_THRESHOLD = 0.2


def cache_dir() -> Path:
    return Path(os.environ.get("NODULEMTL_CACHE", "/work/cache")) / "clinical"


def voi_rows(splits=("train", "val", "test"), data_dir=None) -> list[dict]:
    """labels.csv rows of the VOIs of ``splits`` (plus ``split``), reserved patients dropped."""
    d = Path(data_dir or default_data_dir()) / "lidc_vois"
    sp = load_split()
    which = {p: s for s in splits for p in sp[s] if p not in RESERVED_PATIENTS}
    rows = []
    for r in csv.DictReader(open(d / "labels.csv")):
        if r["patient_id"] in which:
            r["split"] = which[r["patient_id"]]
            r["image_path"], r["mask_path"] = str(d / r["image"]), str(d / r["mask"])
            rows.append(r)
    return rows


def _recording_network(model, device):
    from NoduleMTLLib.inference.pipeline import Click2DNetwork

    class Recording(Click2DNetwork):
        def grid(self, ct, point_lps, zoom):
            self.zoom = zoom
            return super().grid(ct, point_lps, zoom)

        def run_patch(self, hu_zyx, first_half_width=4, step=8, threshold=None):
            prob, logits = super().run_patch(hu_zyx, first_half_width, step, threshold=EXTEND_THRESHOLD)
            self.record[f"z{self.zoom:g}"] = (prob.astype(np.float16), logits)
            return prob, logits

    return Recording(NETWORK, model, device)


_LIVE = []


def _live_network():
    """DSMT-Net on the CPU, loaded once (for zooms missing from a cache file)."""
    if not _LIVE:
        import torch

        from NoduleMTLLib.inference.pipeline import Click2DNetwork
        from NoduleMTLLib.models.registry import load_network
        _LIVE.append(Click2DNetwork(NETWORK, load_network(NETWORK, "cpu"), torch.device("cpu")))
    return _LIVE[0]


def replay_network(npz, threshold: float):
    """A :class:`NoduleMTLLib.inference.pipeline.Click2DNetwork` whose patches come from a cache file."""
    from NoduleMTLLib.inference.pipeline import Click2DNetwork
    from NoduleMTLLib.models.registry import NETWORKS

    if threshold < EXTEND_THRESHOLD:
        raise ValueError(f"cached patches support thresholds >= {EXTEND_THRESHOLD}")

    class _Model:
        seg_border_px = int(npz["seg_border_px"])

    class Replay(Click2DNetwork):
        def __init__(self):
            spec = NETWORKS[NETWORK].input_spec
            self.network_id, self.size, self.spacing = NETWORK, int(spec["size_px"]), float(spec["spacing_mm"])
            self.model = _Model()
            self.threshold = float(threshold)

        @property
        def sign_names(self):
            return tuple(str(s) for s in npz["sign_names"])

        def grid(self, ct, point_lps, zoom):
            self.zoom = zoom
            return super().grid(ct, point_lps, zoom)

        def _run(self, hu_zyx):  # patch slices the cache lacks (the final mask classified on a slice not run)
            return _live_network()._run(hu_zyx)

        def run_patch(self, hu_zyx, first_half_width=4, step=8, threshold=None):
            k = f"z{self.zoom:g}"
            if f"{k}_prob" not in npz:  # a lower threshold can need a zoom the cached run did not: run the network
                return _live_network().run_patch(hu_zyx, first_half_width, step, threshold=self.threshold)
            return npz[f"{k}_prob"].astype(np.float32), npz[f"{k}_logits"]

    return Replay()


def replay(row: dict, threshold: float = 0.5, npz=None, ct=None):
    """(ClickOutput on the VOI, CTVolume) for one cached VOI at a mask ``threshold``."""
    from NoduleMTLLib.core.io import CTVolume

    npz = npz if npz is not None else np.load(cache_dir() / f"{row['patient_id']}_{row['nodule_id']}.npz")
    ct = ct or CTVolume(sitk.ReadImage(row["image_path"]), source=row["image"])
    c = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
    return replay_network(npz, threshold).analyze(ct, c), ct


def main(argv=None) -> int:
    import torch

    from NoduleMTLLib.core.io import CTVolume
    from NoduleMTLLib.models.registry import load_network

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", default="train,val,test")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    net = _recording_network(load_network(NETWORK, "cpu"), torch.device("cpu"))
    rows = voi_rows(tuple(a.splits.split(",")))
    t0 = time.perf_counter()
    for i, r in enumerate(rows):
        f = out / f"{r['patient_id']}_{r['nodule_id']}.npz"
        if f.is_file():
            continue
        ct = CTVolume(sitk.ReadImage(r["image_path"]), source=r["image"])
        c = (float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]))
        if not ct.contains_lps(c):
            continue
        net.record = {}
        o = net.analyze(ct, c)
        arrays = {f"{k}_{n}": v for k, (p, lg) in net.record.items() for n, v in (("prob", p), ("logits", lg))}
        tmp = f.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, sign_names=np.array(net.sign_names), seg_border_px=int(net.model.seg_border_px),
                            probability=np.float64(o.malignancy_probability), **arrays)
        tmp.replace(f)
        if i % 25 == 0:
            print(f"{i + 1}/{len(rows)} {time.perf_counter() - t0:.0f} s", flush=True)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
