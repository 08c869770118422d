"""State of a review session: findings, their statuses, navigation and undo / redo.

Pure Python (no ``slicer``, no trame): the web app (:mod:`NoduleMTLReview.app`) keeps one
:class:`ReviewState` and renders it; ``Testing/Python/test_review_state.py`` tests it
without a browser.

A *finding* is one nodule the reviewer sees: a segment of a NoduleMTL segmentation node,
with its row of values (:func:`finding_row`) and a review status, one of :data:`STATUSES`.
Status changes are undoable (``z``) and redoable (``y``); outline edits have their own undo
stack (trame-slicer's segment editor), so they are not part of this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Review statuses.  Export: SEG, SR, report.html, seg.nrrd and nodules.csv hold only
#: ``accepted`` findings; nodules.json and labels.nrrd keep every finding (statuses in nodules.json).
UNDECIDED, ACCEPTED, REJECTED = "undecided", "accepted", "rejected"
STATUSES = (UNDECIDED, ACCEPTED, REJECTED)

#: Signs listed in the table when the reporting network gives them a probability >= this.
SIGN_THRESHOLD = 0.5


def _num(v) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def finding_row(nodule, network_order=()) -> dict[str, Any]:
    """Display values of one nodule for the findings table.

    Args:
        nodule: a :class:`NoduleMTLLib.core.results.NoduleResult`.
        network_order: the run's network ids (the first one with an output reports).

    Returns:
        ``{"id": int, "axes": "long × short mm" text, "long_mm", "short_mm", "volume_mm3",
        "type", "lung_rads", "p_malignant" (reported, calibrated when available; None
        unknown), "signs" (comma-separated signs with probability >= 0.5), "disagreement"
        (consensus "low"/"high", "" with one network), "detection_score" (None for a click or a nodule found by its shape),
        "point_ras" (the analysed point, R, A, S mm)}``.
    """
    from NoduleMTLLib.outputs.colors import reported_probability

    order = [n for n in network_order if n in nodule.networks] + [n for n in nodule.networks if n not in network_order]
    signs = []
    if order:
        out = nodule.networks[order[0]]
        signs = [s for s, p in (out.sign_probabilities or {}).items() if _num(p) is not None and p >= SIGN_THRESHOLD]
    long_mm, short_mm = _num(nodule.diameter_mm), _num(nodule.short_axis_mm)
    axes = "" if long_mm is None else (f"{long_mm:.1f} × {short_mm:.1f}" if short_mm is not None else f"{long_mm:.1f}")
    cons = getattr(nodule, "consensus", None)
    det = getattr(nodule, "detection", None) or {}
    p = reported_probability(nodule, order)
    return {
        "id": int(nodule.id),
        "axes": axes,
        "long_mm": long_mm,
        "short_mm": short_mm,
        "volume_mm3": _num(nodule.volume_mm3),
        "type": nodule.type or "",
        "lung_rads": ((getattr(nodule, "lung_rads", None) or {}).get("category") or ""),
        "p_malignant": _num(p),
        "signs": ", ".join(signs),
        "disagreement": (getattr(cons, "disagreement", None) or "") if cons is not None else "",
        "detection_score": None if det.get("accepted_as") == "mass_shape" else _num(det.get("score")),
        "point_ras": [round(float(v), 3) for v in nodule.point_ras_mm],
    }


@dataclass
class Finding:
    """One finding of the review.

    Attributes:
        id: finding number, unique in the session (also the nodule id written on export).
        segmentation_node_id, segment_id: where its outline lives in the MRML scene.
        center_ras: (R, A, S) mm where the views are centred when it is selected.
        row: :func:`finding_row` values.
        status: one of :data:`STATUSES`.
    """

    id: int
    segmentation_node_id: str
    segment_id: str
    center_ras: tuple[float, float, float]
    row: dict[str, Any] = field(default_factory=dict)
    status: str = UNDECIDED


class ReviewState:
    """Findings of one review session in table order, the selected one, and the status history.

    Raises (methods): KeyError for an unknown finding id, ValueError for an unknown status.
    """

    def __init__(self):
        self.findings: list[Finding] = []
        self.current: int | None = None  # id of the selected finding
        self._undo: list[tuple[int, str, str]] = []  # (finding id, before, after)
        self._redo: list[tuple[int, str, str]] = []

    # --- findings --------------------------------------------------------
    def next_id(self) -> int:
        return max((f.id for f in self.findings), default=0) + 1

    def add(self, finding: Finding) -> Finding:
        if finding.status not in STATUSES:
            raise ValueError(f"Unknown status {finding.status!r}")
        if any(f.id == finding.id for f in self.findings):
            raise ValueError(f"Finding {finding.id} already exists")
        self.findings.append(finding)
        if self.current is None:
            self.current = finding.id
        return finding

    def get(self, finding_id: int) -> Finding:
        for f in self.findings:
            if f.id == int(finding_id):
                return f
        raise KeyError(f"No finding {finding_id}")

    def remove(self, finding_id: int) -> None:
        f = self.get(finding_id)
        self.findings.remove(f)
        self._undo = [u for u in self._undo if u[0] != f.id]
        self._redo = [u for u in self._redo if u[0] != f.id]
        if self.current == f.id:
            self.current = self.findings[0].id if self.findings else None

    def update_row(self, finding_id: int, row: dict) -> None:
        self.get(finding_id).row = dict(row)

    # --- statuses ----------------------------------------------------------
    def set_status(self, finding_id: int, status: str) -> bool:
        """Set a finding's status (undoable); False when it already had it."""
        if status not in STATUSES:
            raise ValueError(f"Unknown status {status!r}; use one of {', '.join(STATUSES)}")
        f = self.get(finding_id)
        if f.status == status:
            return False
        self._undo.append((f.id, f.status, status))
        self._redo.clear()
        f.status = status
        return True

    def set_current_status(self, status: str) -> bool:
        """Status of the selected finding (keyboard a / r); False when none is selected."""
        return self.current is not None and self.set_status(self.current, status)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> int | None:
        """Undo the last status change; returns the finding id (selected again) or None."""
        if not self._undo:
            return None
        fid, before, after = self._undo.pop()
        self.get(fid).status = before
        self._redo.append((fid, before, after))
        self.current = fid
        return fid

    def redo(self) -> int | None:
        if not self._redo:
            return None
        fid, before, after = self._redo.pop()
        self.get(fid).status = after
        self._undo.append((fid, before, after))
        self.current = fid
        return fid

    # --- navigation ------------------------------------------------------
    def select(self, finding_id: int) -> Finding:
        f = self.get(finding_id)
        self.current = f.id
        return f

    def step(self, delta: int) -> Finding | None:
        """Select the next (+1, key n) or previous (-1, key p) finding, wrapping around."""
        if not self.findings:
            return None
        ids = [f.id for f in self.findings]
        i = ids.index(self.current) if self.current in ids else (-1 if delta > 0 else 0)
        self.current = ids[(i + delta) % len(ids)]
        return self.get(self.current)

    # --- export ------------------------------------------------------------
    def statuses(self) -> dict[int, str]:
        return {f.id: f.status for f in self.findings}

    def accepted_ids(self) -> list[int]:
        return [f.id for f in self.findings if f.status == ACCEPTED]

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for f in self.findings if f.status == s) for s in STATUSES}

    def table_rows(self) -> list[dict]:
        """Rows for the page: the finding's values, its status and whether it is selected."""
        return [dict(f.row, id=f.id, status=f.status, selected=f.id == self.current) for f in self.findings]


def export_selection(result, statuses: dict[int, str]):
    """Split a result for export: ``(accepted, everything)``.

    Args:
        result: :class:`NoduleMTLLib.core.results.AnalysisResult` holding every finding (ids = finding ids).
        statuses: finding id -> status (missing ids count as undecided).

    Returns:
        ``(accepted_result, all_dict)``: a shallow copy of ``result`` holding only the accepted
        nodules (for SEG, SR, report, seg.nrrd and CSV), and the ``nodules.json`` dict of every
        nodule, each with ``"review_status"``.

    Raises:
        ValueError: an unknown status.
    """
    from copy import copy

    for s in statuses.values():
        if s not in STATUSES:
            raise ValueError(f"Unknown status {s!r}")
    accepted = copy(result)
    accepted.nodules = [n for n in result.nodules if statuses.get(n.id, UNDECIDED) == ACCEPTED]
    everything = result.to_dict()
    for d in everything["nodules"]:
        d["review_status"] = statuses.get(int(d["id"]), UNDECIDED)
    everything["review"] = {"counts": {s: sum(1 for d in everything["nodules"] if d["review_status"] == s) for s in STATUSES}}
    return accepted, everything


class PathGuard:
    """The folders the page may read from and write to: those given on the command line.

    :meth:`check` resolves ``..`` and symbolic links before comparing, so no path traversal
    leaves them; a relative path is taken relative to the first folder.

    Args:
        roots: allowed folders.
    """

    def __init__(self, roots):
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def check(self, text, must_exist: bool = True) -> Path:
        """The resolved path of ``text`` if it lies inside an allowed folder.

        Raises:
            NoduleMTLLib.core.io.InputError: empty, outside every allowed folder, or (``must_exist``) missing.
        """
        from NoduleMTLLib.core.io import InputError

        if not str(text or "").strip():
            raise InputError("No path given")
        p = Path(str(text).strip()).expanduser()
        if not p.is_absolute() and self.roots:
            p = self.roots[0] / p
        p = p.resolve()
        if not any(p == r or r in p.parents for r in self.roots):
            raise InputError(f"{text} is outside the folders this server may use: " + ", ".join(str(r) for r in self.roots))
        if must_exist and not p.exists():
            raise InputError(f"{p} does not exist")
        return p
