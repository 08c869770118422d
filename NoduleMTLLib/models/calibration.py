"""Calibrated malignancy probability: applying the calibrators fitted on validation patients.

A network's raw P(malignant) ranks nodules (AUC) but is not a frequency: a nodule given 0.8
is not malignant 8 times in 10.  ``training/calibration.py`` fits, on the **validation
patients' HU VOIs only** (3D click path, click at the labelled centre), a small model that
maps what a run produced to a calibrated probability, and stores it in
``Resources/Weights/calibration.json`` (a few kB of numbers, no pickles).  This module reads
that file and applies it; it never fits anything.

A *probability model* (``models.<id>`` in the JSON) is:

* ``networks``: the click networks whose outputs it needs (the run must include all of them);
* ``score``: how the raw score is formed - ``"network:<id>"`` (that network's probability),
  ``"mean"`` (the mean probability of ``networks``; the consensus probability), or
  ``"stack"`` (a logistic regression of :data:`FEATURES` named in ``stack.features``);
* ``calibrator``: the monotone map from the raw probability to the calibrated one -
  ``identity``; ``temperature`` (``sigmoid(logit(p) / T)``, Guo et al. 2017); ``platt``
  (``sigmoid(a * logit(p) + b)``, Platt 1999); ``isotonic`` (piecewise-linear interpolation
  through the step points ``x`` -> ``y`` of a pool-adjacent-violators fit, Zadrozny & Elkan 2002;
  outside ``[x[0], x[-1]]`` the end values).  A stacked model's logistic regression is its
  own calibration (``identity``).

``default`` names the configuration chosen by measurement (``networks``, ``mask``,
``model``): what ``nodulemtl analyze`` / ``batch`` / the Slicer module run without an
explicit network choice.  For a run, :func:`select_model` picks the model whose ``networks``
equal the run's set of networks (and whose ``mask`` matches the reported mask), else the
calibrated single-network model of the run's first network (the network whose mask is
reported), else none (then the top-level probability is None and the run record says why).

Units: probabilities in [0, 1]; ``volume_mm3`` in mm^3 (feature ``log_volume`` =
``log(1 + volume_mm3)``); ``solid_fraction`` in [0, 1].
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CALIBRATION_FILE = "calibration.json"
#: Format version of calibration.json understood by this module.
FORMAT = 1
#: Probabilities are clipped to [EPS, 1 - EPS] before the logit.
EPS = 1e-4
#: Standardised stack features are clipped to +- this many standard deviations.
Z_CLIP = 4.0
#: Feature names a stacked model may use (computed by :func:`nodule_features`):
#: ``logit:<network>`` (logit of that network's probability), ``log_volume``,
#: ``solid_fraction``, ``diameter_mm``, ``sign:<network>:<sign>`` (that network's sign probability).
FEATURES = ("logit:<network>", "log_volume", "solid_fraction", "diameter_mm", "sign:<network>:<sign>")


from ..core import strict_json  # noqa: E402
from ..core.errors import CalibrationError  # noqa: E402,F401 - defined in errors.py (the one root), importable here


def logit(p) -> np.ndarray:
    """log(p / (1 - p)) after clipping p to [EPS, 1 - EPS]; array-like -> float64 array."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(q / (1 - q))


def sigmoid(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class Calibrator:
    """A monotone map of raw probabilities to calibrated ones.

    Attributes:
        method: ``identity`` | ``temperature`` | ``platt`` | ``isotonic``.
        params: ``{"temperature": T > 0}`` | ``{"a": float, "b": float}`` |
            ``{"x": increasing raw probabilities, "y": non-decreasing calibrated values}``.
    """

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        m, p = self.method, self.params
        if m == "identity":
            return
        if m == "temperature":
            if not float(p.get("temperature", 0)) > 0:
                raise CalibrationError(f"temperature must be > 0, got {p.get('temperature')!r}")
        elif m == "platt":
            if not all(isinstance(p.get(k), (int, float)) for k in ("a", "b")):
                raise CalibrationError(f"platt needs numbers a and b, got {dict(p)!r}")
        elif m == "isotonic":
            x, y = np.asarray(p.get("x", []), float), np.asarray(p.get("y", []), float)
            if len(x) < 1 or x.shape != y.shape or np.any(np.diff(x) < 0) or np.any(np.diff(y) < -1e-12) \
                    or np.any((y < 0) | (y > 1)):
                raise CalibrationError("isotonic needs x increasing and y non-decreasing in [0, 1], of equal length >= 1")
        else:
            raise CalibrationError(f"unknown calibration method {m!r}")

    def __call__(self, p) -> np.ndarray:
        """Raw probabilities (any shape) -> calibrated probabilities (same shape, float64)."""
        p = np.asarray(p, dtype=np.float64)
        if self.method == "identity":
            return p.copy()
        if self.method == "temperature":
            return sigmoid(logit(p) / float(self.params["temperature"]))
        if self.method == "platt":
            return sigmoid(float(self.params["a"]) * logit(p) + float(self.params["b"]))
        x, y = np.asarray(self.params["x"], float), np.asarray(self.params["y"], float)
        return np.interp(p, x, y)

    def to_dict(self) -> dict:
        return {"method": self.method, **{k: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v)
                                          for k, v in self.params.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibrator:
        d = dict(d)
        return cls(d.pop("method", None), d)


@dataclass(frozen=True)
class LinearStack:
    """Logistic regression on standardised features: P = sigmoid(intercept + sum coef_k (f_k - mean_k) / scale_k).

    Attributes:
        features: feature names (see :data:`FEATURES`); mean, scale, coef: one float each.
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float

    def __post_init__(self):
        n = len(self.features)
        if not (len(self.mean) == len(self.scale) == len(self.coef) == n) or n == 0:
            raise CalibrationError("stack: features, mean, scale and coef must have the same non-zero length")
        if any(not s > 0 for s in self.scale):
            raise CalibrationError("stack: every scale must be > 0")

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """X: (N, n_features) float in :attr:`features` order -> (N,) probabilities.

        Standardised features are clipped to +-:data:`Z_CLIP` so that a value far outside
        what the model was fitted on (e.g. a sign probability of 0.5 where validation had
        only values near 0) cannot swing the probability by itself."""
        X = np.asarray(X, dtype=np.float64)
        zf = np.clip((X - np.asarray(self.mean)) / np.asarray(self.scale), -Z_CLIP, Z_CLIP)
        return sigmoid(self.intercept + zf @ np.asarray(self.coef))

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "coef": list(self.coef), "intercept": self.intercept}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinearStack:
        return cls(tuple(d["features"]), tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["scale"]),
                   tuple(float(v) for v in d["coef"]), float(d["intercept"]))


def nodule_features(probabilities: Mapping[str, float | None], measurements: Mapping[str, Any] | None = None,
                    signs: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, float]:
    """The named features of one nodule (missing inputs are simply absent from the dict).

    Args:
        probabilities: network id -> raw P(malignant) (None / NaN when the network gave none).
        measurements: of the reported mask: ``volume_mm3`` (mm^3), ``solid_fraction``, ``diameter_mm`` (mm).
        signs: network id -> {sign name: probability}.
    Returns:
        {feature name: float}, names as in :data:`FEATURES`.
    """
    f: dict[str, float] = {}
    for nid, p in probabilities.items():
        if p is not None and not math.isnan(float(p)):
            f[f"logit:{nid}"] = float(logit(float(p)))
    m = measurements or {}
    if m.get("volume_mm3") is not None:
        f["log_volume"] = math.log1p(max(0.0, float(m["volume_mm3"])))
    for k in ("solid_fraction", "diameter_mm"):
        if m.get(k) is not None:
            f[k] = float(m[k])
    for nid, ss in (signs or {}).items():
        for name, v in (ss or {}).items():
            if v is not None:
                f[f"sign:{nid}:{name}"] = float(v)
    return f


@dataclass(frozen=True)
class ProbabilityModel:
    """One fitted way to turn a run's outputs into a calibrated P(malignant).

    Attributes:
        id: key in calibration.json; networks: click networks it needs; mask: ``"first"`` (the
        mask of ``networks[0]``) or ``"consensus"``: the reported mask its size features were
        measured on (irrelevant for models without size features); score:
        ``"network:<id>"`` | ``"mean"`` | ``"stack"``; calibrator; stack (score ``"stack"`` only);
        info: provenance and metrics, copied from the JSON as is.
    """

    id: str
    networks: tuple[str, ...]
    score: str
    calibrator: Calibrator
    mask: str = "first"
    stack: LinearStack | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.networks:
            raise CalibrationError(f"model {self.id!r}: no networks")
        if self.score == "stack":
            if self.stack is None:
                raise CalibrationError(f"model {self.id!r}: score 'stack' needs a stack")
        elif self.score.startswith("network:"):
            if self.score.split(":", 1)[1] not in self.networks:
                raise CalibrationError(f"model {self.id!r}: {self.score} is not one of its networks")
        elif self.score != "mean":
            raise CalibrationError(f"model {self.id!r}: unknown score {self.score!r}")

    @property
    def uses_size(self) -> bool:
        """True when the model reads measurements of the reported mask (a stack with size features)."""
        return self.stack is not None and any(f in ("log_volume", "solid_fraction", "diameter_mm") for f in self.stack.features)

    def raw(self, features: Mapping[str, float]) -> float | None:
        """The uncalibrated score (a probability) from :func:`nodule_features`; None when an input is missing."""
        if self.score == "stack":
            if any(k not in features for k in self.stack.features):
                return None
            return float(self.stack(np.array([[features[k] for k in self.stack.features]]))[0])
        nets = [self.score.split(":", 1)[1]] if self.score.startswith("network:") else list(self.networks)
        if any(f"logit:{n}" not in features for n in nets):
            return None
        return float(np.mean(sigmoid([features[f"logit:{n}"] for n in nets])))

    def predict(self, features: Mapping[str, float]) -> float | None:
        """Calibrated P(malignant) in [0, 1], or None when an input is missing."""
        r = self.raw(features)
        return None if r is None else float(self.calibrator(r))

    def to_dict(self) -> dict:
        d = {"networks": list(self.networks), "mask": self.mask, "score": self.score,
             "calibrator": self.calibrator.to_dict()}
        if self.stack is not None:
            d["stack"] = self.stack.to_dict()
        d.update({k: v for k, v in self.info.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, mid: str, d: Mapping[str, Any]) -> ProbabilityModel:
        known = {"networks", "mask", "score", "calibrator", "stack"}
        try:
            return cls(mid, tuple(d["networks"]), d["score"], Calibrator.from_dict(d["calibrator"]), d.get("mask", "first"),
                       LinearStack.from_dict(d["stack"]) if d.get("stack") else None,
                       {k: v for k, v in d.items() if k not in known})
        except KeyError as e:
            raise CalibrationError(f"model {mid!r}: missing key {e}") from None


@dataclass
class CalibrationSet:
    """Every model of calibration.json and the default configuration.

    Attributes:
        models: id -> :class:`ProbabilityModel`.
        default: ``{"networks": [...], "mask": "first"|"consensus", "model": id}``, or empty.
        source: path it was read from (for the run record), or None.
        info: the rest of the file (provenance), as is.
    """

    models: dict[str, ProbabilityModel]
    default: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def select_model(self, networks: Sequence[str], mask: str = "first") -> ProbabilityModel | None:
        """The model for a run of ``networks`` (first one = reported mask) with the reported ``mask``.

        Order: the default model when the run is the default configuration; a model whose
        set of networks equals the run's (a model with size features only when it measured
        the same mask: the run's first network's mask for ``mask="first"``, the consensus for
        ``"consensus"``); the single-network model of the first network (``score ==
        "network:<first>"``); else None.
        """
        nets = tuple(networks)
        if not nets:
            return None
        d = self.default
        if d and tuple(d.get("networks", ())) == nets and d.get("mask", "first") == mask and d.get("model") in self.models:
            return self.models[d["model"]]
        for m in self.models.values():
            if set(m.networks) != set(nets) or (len(nets) > 1 and m.score.startswith("network:")):
                continue
            if m.uses_size and (m.mask != mask or (mask == "first" and m.networks[0] != nets[0])):
                continue
            return m
        for m in self.models.values():
            if m.networks == (nets[0],) and m.score == f"network:{nets[0]}":
                return m
        return None

    def to_dict(self) -> dict:
        return {"format": FORMAT, **self.info, "default": self.default,
                "models": {k: m.to_dict() for k, m in self.models.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> CalibrationSet:
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, Mapping) else repr(d)
            raise CalibrationError(f"calibration file {source or ''}: format {found}, expected {FORMAT}")
        models = {k: ProbabilityModel.from_dict(k, v) for k, v in (d.get("models") or {}).items()}
        default = dict(d.get("default") or {})
        if default and default.get("model") not in models:
            raise CalibrationError(f"calibration file {source or ''}: default model {default.get('model')!r} is not in models")
        info = {k: v for k, v in d.items() if k not in ("format", "default", "models")}
        return cls(models, default, source, info)


def calibration_path() -> Path | None:
    """Where calibration.json is read: ``$NODULEMTL_CALIBRATION`` (a file) if set, else the
    first ``calibration.json`` in the weights search path (``NoduleMTLLib.models.registry``); None if none exists."""
    env = os.environ.get("NODULEMTL_CALIBRATION")
    if env:
        return Path(env)
    from .registry import weights_search_path

    for d in weights_search_path():
        p = Path(d) / CALIBRATION_FILE
        if p.is_file():
            return p
    return None


def load_calibration(path: str | os.PathLike | None = None) -> CalibrationSet | None:
    """Read calibration.json (``path``, else :func:`calibration_path`); None when there is none.

    The file found in a weights folder (not one named by ``path`` or ``$NODULEMTL_CALIBRATION``)
    is verified like weights: its size and sha256 must match the ``calibration`` entry of that
    folder's ``models.json`` (else the shipped one; :func:`NoduleMTLLib.models.registry.manifest_for`).
    After changing calibration.json, re-record its checksum with :func:`record_checksum`
    (``python -m NoduleMTLLib.models.calibration record``; ``training/calibration.py --write-weights``
    does it itself).  Every file is schema-checked: valid JSON, no NaN / infinite number, the
    format and keys of :meth:`CalibrationSet.from_dict`.

    Raises:
        CalibrationError: the file exists but fails its checksum, is not valid JSON, holds a
            non-finite number, or is not a valid calibration set (the message names the file).
    """
    explicit = path is not None or bool(os.environ.get("NODULEMTL_CALIBRATION"))
    p = Path(path) if path is not None else calibration_path()
    if p is None or not p.is_file():
        if explicit:
            raise CalibrationError(f"calibration file {p} not found")
        return None
    if not explicit:
        verify_checksum(p)
    try:
        d = strict_json.read(p)
    except (OSError, ValueError) as e:
        raise CalibrationError(f"calibration file {p}: {' '.join(str(e).split())}") from None
    try:
        return CalibrationSet.from_dict(d, str(p))
    except CalibrationError as e:
        raise CalibrationError(str(e) if str(p) in str(e) else f"calibration file {p}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CalibrationError(f"calibration file {p}: not a valid calibration set ({type(e).__name__}: {e})") from None


def verify_checksum(path: Path) -> None:
    """Check ``path`` (a calibration.json in a weights folder) against the ``calibration`` entry
    (``file``, ``size_bytes``, ``sha256``) of its manifest (:func:`NoduleMTLLib.models.registry.manifest_for`).

    Raises:
        CalibrationError: no entry (unverified: refused), or size / sha256 differ.
    """
    from .registry import WeightsError, manifest_for, sha256_of

    try:
        man, mpath = manifest_for(path)
    except WeightsError as e:
        raise CalibrationError(str(e)) from None
    entry = man.get("calibration")
    if not isinstance(entry, dict) or entry.get("file") != path.name:
        raise CalibrationError(f"calibration file {path} is not recorded in {mpath}: refused unverified "
                               "(record it: python -m NoduleMTLLib.models.calibration record)")
    if path.stat().st_size != entry.get("size_bytes") or sha256_of(path) != entry.get("sha256"):
        raise CalibrationError(f"calibration file {path} fails its sha256 check against {mpath} (corrupt or edited; "
                               "after a deliberate change re-record it: python -m NoduleMTLLib.models.calibration record)")


def record_checksum(path: str | os.PathLike | None = None, manifest_path: str | os.PathLike | None = None) -> dict:
    """Record calibration.json's size and sha256 in models.json (the ``calibration`` entry), so that
    :func:`load_calibration` accepts it.  Run after every deliberate change of the file.

    Args:
        path: the calibration file (default ``Resources/Weights/calibration.json``).
        manifest_path: the manifest (default ``models.json`` beside ``path``).

    Returns:
        The entry written.  Raises CalibrationError when the file is not a valid calibration
        set (it is checked first) and OSError when the manifest cannot be written.
    """
    from .registry import resources_dir, sha256_of, write_manifest

    p = Path(path) if path is not None else resources_dir() / "Weights" / CALIBRATION_FILE
    load_calibration(p)  # schema check before vouching for it
    mp = Path(manifest_path) if manifest_path is not None else p.parent / "models.json"
    man = json.loads(mp.read_text(encoding="utf-8")) if mp.is_file() else {"format": 1, "networks": {}}
    entry = {"file": p.name, "size_bytes": p.stat().st_size, "sha256": sha256_of(p)}
    man["calibration"] = entry
    write_manifest(mp, man)
    return entry


def apply_to_result(result, calibration: CalibrationSet | None = None) -> None:
    """Set each nodule's top-level ``malignancy_probability`` and describe it in ``result.run``.

    The features of a nodule are its networks' raw probabilities and signs and the
    measurements of its reported mask.  A nodule whose reported mask is empty (not found)
    gets None.  ``result.run["malignancy_probability"]`` records the model id, networks,
    score, calibration method, the file and the model's provenance (``fitted_on``), or why
    no calibrated probability could be given.

    Args:
        result: :class:`NoduleMTLLib.core.results.AnalysisResult` of the click path.
        calibration: a loaded set; None reads the default file (:func:`load_calibration`).

    Raises:
        CalibrationError: the default file is corrupt, unverified or invalid (never a silent None).
    """
    cs = calibration if calibration is not None else load_calibration()  # CalibrationError: a bad file stops the run
    why = "no calibration.json found"
    nets = list(result.run.get("networks", []))
    mask = "consensus" if result.run.get("reported_mask") == "consensus" else "first"
    model = cs.select_model(nets, mask) if cs is not None else None
    if model is None:
        if cs is not None:
            why = f"no calibrated model for networks {','.join(nets)} (mask {mask})"
        for n in result.nodules:
            n.malignancy_probability = None
        result.run["malignancy_probability"] = {"model": None, "reason": why}
        return
    for n in result.nodules:
        if not n.found:
            n.malignancy_probability = None
            continue
        probs = {k: v.malignancy_probability for k, v in n.networks.items()}
        signs = {k: v.sign_probabilities for k, v in n.networks.items()}
        meas = {"volume_mm3": n.volume_mm3, "solid_fraction": n.solid_fraction, "diameter_mm": n.diameter_mm}
        p = model.predict(nodule_features(probs, meas, signs))
        n.malignancy_probability = None if p is None else round(p, 4)
    result.run["malignancy_probability"] = {
        "model": model.id, "networks": list(model.networks), "score": model.score, "mask": model.mask,
        "calibration": model.calibrator.method, "file": None if cs.source is None else Path(cs.source).name,
        "default_configuration": bool(cs.default and cs.default.get("model") == model.id
                                      and list(cs.default.get("networks", [])) == nets),
        "fitted_on": model.info.get("fitted_on")}


if __name__ == "__main__":  # python -m NoduleMTLLib.models.calibration record [CALIBRATION_JSON [MODELS_JSON]]
    import sys

    if len(sys.argv) < 2 or sys.argv[1] != "record" or len(sys.argv) > 4:
        sys.exit("usage: python -m NoduleMTLLib.models.calibration record [CALIBRATION_JSON [MODELS_JSON]]")
    print(json.dumps(record_checksum(*sys.argv[2:4]), allow_nan=False))
