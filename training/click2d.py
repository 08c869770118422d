"""Training and evaluation recipe for the 2D click networks (LNMSNet, detection-guided model)
on ``lidc_slices`` (2D, four readers' masks).  The network comes from ``cfg["network"]``
through the registry; networks with ``forward_all`` (the detection-guided model) add their
size-class loss and are trained on their raw segmentation logits (the spatial prior is
applied at evaluation/inference, as in the click path).

Segmentation target: the readers' >= 50 % consensus mask.  Classification target: see
``training.data.malignancy_label`` (ratings 2.5-3.5 excluded from the loss and from AUC).
Loss: BCE + soft Dice (segmentation) + ``cls_loss_weight`` x BCE (malignancy), joint
training as in the paper (weights not given in the abstract; we use 1 and 0.5).
Optimiser AdamW, linear warm-up then cosine decay (not specified in the paper).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from NoduleMTLLib.core.metrics import binary_classification_stats, dice
from NoduleMTLLib.inference.aggregation import nodule_logit_from_slices, sigmoid
from NoduleMTLLib.inference.preprocessing import normalize_slices
from NoduleMTLLib.models.registry import build_network
from training.augment import sample_batch
from training.checkpoint import load_checkpoint, plain
from training.data import load_slice_nodules, load_split
from training.losses import masked_bce, seg_loss


def _lr_at(epoch_float: float, cfg: dict) -> float:
    w = cfg["warmup_epochs"]
    if epoch_float < w:
        return cfg["lr"] * max(0.05, epoch_float / w)
    t = (epoch_float - w) / max(1e-9, cfg["epochs"] - w)
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@torch.inference_mode()
def evaluate_nodules(model: torch.nn.Module, nodules, cfg: dict, batch: int = 64) -> dict:
    """Nodule-level evaluation on the network grid (centred, no augmentation).

    Dice: per nodule over the whole slice stack (prediction > 0.5 vs resampled consensus),
    then mean/median over nodules.  Malignancy: area-weighted slice logits
    (``NoduleMTLLib.inference.aggregation``), ACC/SEN/SPE/AUC over nodules with label 0/1.
    Also MT-Net's segmentation set (paper Eqs. 7-11): per-nodule Jaccard (``jaccards``,
    ``jaccard_mean``) and pixel counts TP/FP/TN/FN summed over every slice of every nodule on
    the 96 x 96 px, 0.8 mm network grid (``pixel``: sums and the pooled ACC, recall = SEN,
    SPE; ACC and SPE depend on the field of view, MT-Net used 64 px crops).
    """
    from NoduleMTLLib.core.metrics import iou
    model.eval()
    dices, labels, probs = [], [], []
    jaccards, pix = [], {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    sign_names = tuple(getattr(model, "sign_heads", ()))
    sign_lp = {h: ([], []) for h in sign_names}  # head -> (labels, probs)
    if sign_names:
        from NoduleMTLLib.models.networks.dsmtnet import LIDC_HEAD_RULES, lidc_head_label
    for nd in nodules:
        s = len(nd.image)
        x, y = sample_batch(list(nd.image), list(nd.consensus), [nd.spacing_mm] * s,
                            cfg["input_size_px"], cfg["input_spacing_mm"], rng=None)
        segs, logits, slogits = [], [], []
        for i in range(0, s, batch):
            xb = normalize_slices(x[i:i + batch])
            if sign_names:
                sg, lg, sd = model.forward_click(xb)
                slogits.append(torch.stack([sd[h] for h in sign_names], 1))
            else:
                sg, lg = model(xb)
            segs.append(torch.sigmoid(sg)); logits.append(lg)
        seg = torch.cat(segs)[:, 0].numpy() > 0.5
        lg = torch.cat(logits).numpy()
        areas = seg.reshape(s, -1).sum(1)
        ref = y[:, 0].numpy() > 0.5
        dices.append(dice(seg, ref))
        jaccards.append(iou(seg, ref))
        for k, v in (("tp", seg & ref), ("fp", seg & ~ref), ("tn", ~seg & ~ref), ("fn", ~seg & ref)):
            pix[k] += int(v.sum())
        if nd.label >= 0:
            labels.append(nd.label)
            probs.append(float(sigmoid(nodule_logit_from_slices(lg, areas))))
        if sign_names:
            sl = torch.cat(slogits).numpy()
            for k, h in enumerate(sign_names):
                field = LIDC_HEAD_RULES[h].field
                t = lidc_head_label(h, nd.ratings[field]) if field in nd.ratings else -1
                if t >= 0:
                    sign_lp[h][0].append(t)
                    sign_lp[h][1].append(float(sigmoid(nodule_logit_from_slices(sl[:, k], areas))))
    cls = binary_classification_stats(labels, probs)
    out = {"n_nodules": len(nodules), "dice_mean": float(np.mean(dices)), "dice_median": float(np.median(dices)),
           "dices": [round(d, 4) for d in dices], "classification": cls, "probs": probs, "labels": labels,
           "jaccard_mean": float(np.mean(jaccards)), "jaccards": [round(j, 4) for j in jaccards],
           "pixel": {**pix, "accuracy": (pix["tp"] + pix["tn"]) / max(1, sum(pix.values())),
                     "recall": pix["tp"] / max(1, pix["tp"] + pix["fn"]),
                     "specificity": pix["tn"] / max(1, pix["tn"] + pix["fp"])}}
    if sign_names:
        out["signs"] = {h: {**binary_classification_stats(*sign_lp[h]), "labels": sign_lp[h][0],
                            "probs": [float(v) for v in sign_lp[h][1]]} for h in sign_names}
    return out


def head_labels(model: torch.nn.Module, nodules, chunk) -> dict | None:
    """Per-sample labels of a multi-head network's sign heads (DSMT-Net), ``None`` otherwise.

    Args: model (with ``sign_heads``); nodules: list of :class:`training.data.SliceNodule`;
    chunk: [(nodule index, slice index)].  A slice without the nodule gets -1 (excluded),
    as for malignancy.  Label rules: ``NoduleMTLLib.models.networks.dsmtnet.LIDC_HEAD_RULES``
    (medians of the readers' ratings).
    Returns: {head: (N,) long tensor in {-1, 0, 1}}.
    """
    heads = getattr(model, "sign_heads", ())
    if not heads:
        return None
    from NoduleMTLLib.models.networks.dsmtnet import LIDC_HEAD_RULES, lidc_head_label
    out = {}
    for h in heads:
        field = LIDC_HEAD_RULES[h].field
        out[h] = torch.tensor([lidc_head_label(h, nodules[i].ratings[field])
                               if field in nodules[i].ratings and nodules[i].consensus[k].any() else -1
                               for i, k in chunk])
    return out


def joint_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lab: torch.Tensor, cfg: dict,
               signs: dict | None = None) -> torch.Tensor:
    """Per-network joint loss on a batch x (N, 1, H, W), y (N, 1, H, W) {0, 1}, lab (N,) {-1, 0, 1}:
    the loss the network declares (``model.training_loss``, the click-network contract of
    :mod:`NoduleMTLLib.models.contract`), computed by :data:`LOSSES`.

    * ``"seg_cls"`` (LNMSNet): segmentation (BCE + soft Dice) + ``cls_loss_weight`` x masked malignancy BCE.
    * ``"seg_cls_size"`` (detection-guided model, ``forward_all`` with a size head): + ``size_loss_weight`` x
      size-class cross-entropy.
    * ``"mtnet"`` (MT-Net): ``training.losses.mtnet_loss`` - hybrid Dice + 0.02 rank loss
      on the coarse and fine masks + ``cls_loss_weight`` x BCE of Class-net (paper 3.3).
    * ``"multi_head"`` (DSMT-Net, ``forward_click``): auxiliary segmentation (BCE + soft Dice, on the local
      crop only, weight ``seg_loss_weight``) + ``cls_loss_weight`` x sum of the heads' masked
      BCE (``multi_head_bce``, weights ``model.head_loss_weights`` - stage 2 zeroes the
      auxiliary heads).

    Raises:
        ValueError: the network declares no training loss, or one :data:`LOSSES` does not know.
    """
    name = getattr(model, "training_loss", None)
    if name not in LOSSES:
        raise ValueError(f"{type(model).__name__} declares training_loss {name!r}: a click network declares one of "
                         f"{', '.join(LOSSES)} (NoduleMTLLib.models.contract.ClickNetworkBase gives 'seg_cls')")
    return LOSSES[name](model, x, y, lab, cfg, signs)


def _seg_cls_loss(model, x, y, lab, cfg, signs=None) -> torch.Tensor:
    seg, cls = model(x)
    return seg_loss(seg, y) + cfg["cls_loss_weight"] * masked_bce(cls, lab)


def _seg_cls_size_loss(model, x, y, lab, cfg, signs=None) -> torch.Tensor:
    import torch.nn.functional as F

    from NoduleMTLLib.models.networks.detguided import size_class_from_mask
    out = model.forward_all(x)
    size_t = torch.tensor([size_class_from_mask(m[0], cfg["input_spacing_mm"]) for m in y])
    return (seg_loss(out["seg"], y) + cfg["cls_loss_weight"] * masked_bce(out["malignancy"], lab)
            + cfg.get("size_loss_weight", 0.5) * F.cross_entropy(out["size_logits"], size_t))


def _mtnet_loss(model, x, y, lab, cfg, signs=None) -> torch.Tensor:
    from training.losses import mtnet_loss
    return mtnet_loss(model.forward_all(x), y, lab, cls_weight=cfg["cls_loss_weight"])["total"]


def _multi_head_loss(model, x, y, lab, cfg, signs=None) -> torch.Tensor:
    from training.losses import multi_head_bce
    seg, main, sg = model.forward_click(x)
    b = model.seg_border_px * x.shape[-1] // 96
    h, w = x.shape[-2:]
    ls = seg_loss(seg[..., b:h - b, b:w - b], y[..., b:h - b, b:w - b])
    logits = {model.main_head: main, **sg}
    labels = {model.main_head: lab, **(signs or {})}
    weights = getattr(model, "head_loss_weights", None)
    lc = multi_head_bce(logits, labels, weights)["total"]
    return cfg.get("seg_loss_weight", 1.0) * getattr(model, "seg_weight", 1.0) * ls + cfg["cls_loss_weight"] * lc


#: ``ClickNetwork.training_loss`` name -> ``loss(model, x, y, lab, cfg, signs)`` (names and
#: meaning: :data:`NoduleMTLLib.models.contract.TRAINING_LOSSES`).
LOSSES = {"seg_cls": _seg_cls_loss, "seg_cls_size": _seg_cls_size_loss, "mtnet": _mtnet_loss,
          "multi_head": _multi_head_loss}


def add_hu_sources(cfg: dict, split: dict, data_dir=None, limit_nodules: int | None = None, log=print) -> list:
    """Extra HU training sources named in ``cfg["hu_sources"]`` (issue 13: train on the product's
    input), training patients only.

    ``{"lidc_vois": k}``: the training patients' HU VOIs (``training.data.load_voi_nodules``),
    ``k`` samples per nodule per epoch; ``{"wholescan": k}``: the training patients' whole LIDC
    scans in ``$NODULEMTL_CACHE/wholescan`` (``training.data.load_wholescan_nodules``; patients
    in both the whole-scan split's and the patient split's train lists).
    Returns: [(list of SliceNodule, k)].
    """
    from training.data import load_voi_nodules, load_wholescan_nodules
    out = []
    src = cfg.get("hu_sources") or {}
    train = set(split["train"])
    if src.get("lidc_vois"):
        v = load_voi_nodules(data_dir, train)
        v = v[:limit_nodules] if limit_nodules else v
        log(f"HU source lidc_vois: {len(v)} nodules of training patients")
        out.append((v, int(src["lidc_vois"])))
    if src.get("wholescan"):
        from training import wholescan
        ws = wholescan.default_cache()
        pats = [p for p in wholescan.load_split()["train"] if p in train and (ws / p / "ct.nrrd").is_file()]
        w = load_wholescan_nodules(ws, pats)
        log(f"HU source wholescan: {len(w)} nodules of {len(pats)} whole training scans ({', '.join(pats)})")
        out.append((w, int(src["wholescan"])))
    return out


def hu_augment(nd, k: int, cfg: dict, rng: np.random.Generator) -> np.ndarray:
    """One HU slice (HU + 1024, float32 (H, W)) of an HU training nodule, augmented for what varies
    between scanners: with probability ``p_thick_slice`` the mean of the 3 or 5 slices around
    ``k`` (a thicker reconstruction: 2.5 mm slices -> 7.5-12.5 mm, 1.25 mm -> 3.75-6.25 mm),
    then Gaussian noise with sigma drawn from [0, ``max_noise_hu``] HU.  Air stays >= 0."""
    img = nd.image[k]
    if rng.random() < cfg.get("p_thick_slice", 0.0):
        r = int(rng.integers(1, 3))
        img = nd.image[max(0, k - r):k + r + 1].mean(0)
    sigma = float(rng.uniform(0, cfg.get("max_noise_hu", 0.0)))
    if sigma > 0:
        img = np.maximum(img + rng.normal(0, sigma, img.shape).astype(np.float32), 0)
    return img


def train(cfg: dict, out_dir: Path, data_dir=None, limit_nodules: int | None = None, log=print) -> Path:
    """Train a 2D click network (cfg["network"]); resumes from ``out_dir/last.pt`` if present. Returns the best checkpoint path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.get("threads", 2))
    torch.manual_seed(cfg["seed"])
    split = load_split()
    tr = load_slice_nodules(data_dir, set(split["train"]))
    va = load_slice_nodules(data_dir, set(split["val"]))
    if limit_nodules:
        tr, va = tr[:limit_nodules], va[: max(4, limit_nodules // 4)]
    spn = [cfg["samples_per_nodule_per_epoch"]] * len(tr)  # samples per nodule per epoch
    is_hu = [False] * len(tr)
    extra = add_hu_sources(cfg, split, data_dir, limit_nodules, log)
    for nodes, k in extra:
        tr += nodes; spn += [k] * len(nodes); is_hu += [True] * len(nodes)
    log(f"train nodules {len(tr)} (slices {sum(len(n.image) for n in tr)}), val nodules {len(va)}")
    model = build_network(cfg["network"])
    if cfg.get("frozen_layers"):
        from NoduleMTLLib.models.networks.detguided import freeze_layers
        freeze_layers(model, cfg["frozen_layers"])
    if cfg.get("init_from"):  # transfer learning / fine-tuning: start from a checkpoint or shipped weights
        init = Path(cfg["init_from"])
        if not init.is_absolute() and not init.exists():
            init = Path(__file__).resolve().parents[1] / init
        if init.suffix == ".safetensors":
            from NoduleMTLLib.models.registry import load_weights_into
            load_weights_into(model, init)
        else:
            model.load_state_dict(load_checkpoint(init)["model"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    stage2_from = cfg["epochs"] - cfg.get("stage2_epochs", 0) if cfg.get("stage2_epochs") else None
    stage = 1

    def enter_stage2():
        # DSMT-Net two-stage training: joint multi-task, then main-task fine-tuning (dsmtnet.stage_parameters)
        from NoduleMTLLib.models.networks.dsmtnet import stage_parameters
        plan = stage_parameters(model.net, 2, base_lr=cfg["lr"], backbone_lr_scale=cfg.get("stage2_backbone_lr_scale", 0.1))
        model.head_loss_weights, model.seg_weight = plan.loss_weights, plan.seg_weight
        groups = [{"params": g["params"], "lr": g["lr"], "lr_scale": g["lr"] / cfg["lr"]} for g in plan.param_groups]
        log(f"stage 2: main-task fine-tuning, frozen {len(plan.frozen)} tensors")
        return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    start, best, history = 0, -1.0, []
    last = out_dir / "last.pt"
    if last.exists():
        ck = load_checkpoint(last)
        model.load_state_dict(ck["model"])
        if ck.get("stage", 1) == 2:
            opt, stage = enter_stage2(), 2
        opt.load_state_dict(ck["opt"])
        start, best, history = ck["epoch"] + 1, ck["best"], ck["history"]
        log(f"resumed from epoch {start}")
    rng = np.random.default_rng(cfg["seed"] + start)
    for epoch in range(start, cfg["epochs"]):
        if stage2_from is not None and epoch >= stage2_from and stage == 1:
            opt, stage = enter_stage2(), 2
            best = -1.0  # stage 2 picks its own best checkpoint (main task)
        model.train()
        t0 = time.time()
        items = []
        for ni, nd in enumerate(tr):
            has = np.nonzero(nd.consensus.reshape(len(nd.image), -1).any(1))[0]
            for _ in range(spn[ni]):
                if len(has) and rng.random() < cfg["p_slice_with_mask"]:
                    items.append((ni, int(rng.choice(has))))
                else:
                    items.append((ni, int(rng.integers(len(nd.image)))))
        rng.shuffle(items)
        nb = len(items) // cfg["batch_size"]
        losses = []
        for b in range(nb):
            for g in opt.param_groups:
                g["lr"] = _lr_at(epoch + b / nb, cfg) * g.get("lr_scale", 1.0)
            chunk = items[b * cfg["batch_size"]:(b + 1) * cfg["batch_size"]]
            x, y = sample_batch([hu_augment(tr[i], k, cfg, rng) if is_hu[i] else tr[i].image[k] for i, k in chunk],
                                [tr[i].consensus[k] for i, k in chunk],
                                [tr[i].spacing_mm for i, _ in chunk], cfg["input_size_px"], cfg["input_spacing_mm"], rng,
                                cfg["max_shift_mm"], tuple(cfg["zoom_range"]), cfg["p_zoom_out"])
            # classification only on slices that show the nodule
            lab = torch.tensor([tr[i].label if tr[i].consensus[k].any() else -1 for i, k in chunk])
            loss = joint_loss(model, normalize_slices(x), y, lab, cfg, head_labels(model, tr, chunk))
            opt.zero_grad(); loss.backward(); opt.step()
            losses.append(float(loss.detach()))
        if cfg.get("select_on") == "vois3d":  # the product's path: 3D click on the val patients' HU VOIs
            from training.evaluate_click import evaluate_vois
            model.eval()
            e3 = evaluate_vois(cfg["network"], "val", data_dir, limit=limit_nodules, log=lambda _s: None, model=model)
            auc = e3["classification"]["auc"]
            score = e3["dice3d_mean"] + (auc if not math.isnan(auc) else 0)
            rec = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_dice3d_mean": e3["dice3d_mean"],
                   "val_dice3d_median": e3["dice3d_median"], "val_found": e3["found"], "val_n": e3["n_nodules"],
                   "val_auc": auc, "val_acc": e3["classification"]["accuracy"], "epoch_s": round(time.time() - t0, 1)}
        else:
            ev = evaluate_nodules(model, va, cfg)
            score = ev["dice_mean"] + (ev["classification"]["auc"] if not math.isnan(ev["classification"]["auc"]) else 0)
            rec = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_dice_mean": ev["dice_mean"],
                   "val_auc": ev["classification"]["auc"], "val_acc": ev["classification"]["accuracy"],
                   "epoch_s": round(time.time() - t0, 1)}
        history.append(rec)
        log(json.dumps(rec))
        if score > best:
            best = score
            torch.save({"model": model.state_dict(), **plain({"epoch": epoch, "val": rec, "config": cfg})}, out_dir / "best.pt")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    **plain({"epoch": epoch, "best": best, "history": history, "config": cfg, "stage": stage})},
                   out_dir / "tmp_last.pt")
        (out_dir / "tmp_last.pt").replace(last)
    return out_dir / "best.pt"
