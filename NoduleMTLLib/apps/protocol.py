"""The worker protocol: typed JSON requests and events between a client and the analysis worker.

A client (the Slicer module through :class:`NoduleMTLLib.apps.runner.AnalysisProcess`, a web
reviewer or a script through :class:`NoduleMTLLib.apps.runner.Runner`) sends one
:class:`AnalysisRequest` per analysis to the persistent worker (:mod:`NoduleMTLLib.apps.worker`);
the worker answers with a stream of events for that request.  Both are one JSON object per
line (UTF-8, ``\\n``-terminated): requests on the worker's stdin, events on its stdout.  The
worker's stderr is a free-form log, never parsed.  Full description with examples:
``docs/worker-protocol.md``.

Request (:class:`AnalysisRequest`)::

    {"version": 1, "request_id": "7f3a...", "mode": "analyze", "ct": "/tmp/run/input.nrrd",
     "out": "/tmp/run/out", "points_lps": [[71.1, 77.4, -190.4]], "networks": ["lnmsnet"],
     "device": "cpu", ...}

Its fields are the arguments of the analysis service (:func:`NoduleMTLLib.service.analysis.analyze`
for ``mode="analyze"``, :func:`NoduleMTLLib.service.analysis.reclassify` for ``"reclassify"``), the
input files and the output options.  A field that the service takes names its parameter in the
field's metadata (``service=...``); :meth:`AnalysisRequest.service_kwargs` hands every such field
to the service, so **a new option is added in one place: one field here** (plus the service's
own parameter).  Unknown keys, a missing ``mode``/``ct``/``out``, a value of the wrong type or
another protocol version are refused (:class:`ProtocolError`, exit code 2).

Events (:data:`EVENT_TYPES`), each with ``version``, ``event`` (the kind) and ``request_id``:

* ``progress``: ``fraction`` in [0, 1] and ``message`` (may be "").
* ``message``: ``text`` and ``level`` (``"info"``, ``"warning"`` or ``"note"``) for the user.
* ``result`` (terminal, success): ``out`` (the output folder, complete: ``labels.nrrd``,
  ``nodules.json``, ...), ``files``, ``n_nodules``, ``n_found``, ``device``, ``seconds``.
* ``error`` (terminal, failure): ``message`` (one readable line), ``error_type`` (the
  exception class) and ``exit_code`` (2: bad request; otherwise the exception's ``exit_code``,
  default 1: bad input, weights, device or output folder).  Nothing is left in ``out``.

Every request ends with exactly one terminal event; requests run one at a time.  Cancel is not
a message: the client kills the worker's process group (the only way to stop torch at once) and
the next request starts a new worker.  No third-party import (the module loads in Slicer's GUI
process before torch is installed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

#: Version of the request and event formats; a peer speaking another version is refused.
PROTOCOL_VERSION = 1


from ..core.errors import ProtocolError  # noqa: E402,F401 - defined in errors.py (the one root), importable here


def _service(name: str) -> dict:
    return {"service": name}


@dataclass
class AnalysisRequest:
    """One analysis for the worker: what to read, how to analyse it, where to write.

    Points are world LPS millimetres (DICOM/ITK; the Slicer module converts from RAS).

    Attributes:
        mode: ``"analyze"`` (segment at ``points_lps`` or search the whole scan with
            ``detect``) or ``"reclassify"`` (measure and classify the given ``masks``).
        ct: CT image file (NRRD, NIfTI, MetaImage) or DICOM series folder.
        out: output folder (created when the results are ready; refused if it holds earlier
            outputs unless ``overwrite``; rules of :mod:`NoduleMTLLib.core.safe_output`).
        points_lps: (x, y, z) LPS mm per nodule (``analyze``: required unless ``detect``;
            ``reclassify``: optional, one per mask).
        detect: whole-scan search instead of points (``analyze`` only).
        networks: click network ids (None: the registry's default; ``[]`` with ``detect``:
            detection only).
        device: compute device.
        mask: click path's reported mask, ``"first"`` or ``"consensus"``.
        threshold: ``detect``: ``"default"``, ``"adaptive"`` or a minimum score in [0, 1].
        patient: Brock inputs over the CT's DICOM header (``age``, ``sex``,
            ``family_history``, ``emphysema``).
        masks: ``reclassify``: mask files on the CT grid (non-zero = nodule), one per nodule.
        nodule_ids: ``reclassify``: the id of each mask (default 1..N).
        size_corrections: ``reclassify``: the size correction each nodule was reported with
            (``nodules.json``'s ``size_correction``) or None, one per mask; kept while the mask is unchanged.
        overwrite, dicom_seg, dicom_sr, pictures: output options as the CLI's ``--overwrite``,
            ``--dicom-seg``, ``--dicom-sr`` (implies ``dicom_seg``) and not ``--no-pictures``.
        request_id: echoed in every event (the runner sets a fresh one when empty).
        version: :data:`PROTOCOL_VERSION`.
    """

    mode: Literal["analyze", "reclassify"]
    ct: str
    out: str
    points_lps: list[list[float]] = field(default_factory=list, metadata=_service("points_lps"))
    detect: bool = field(default=False, metadata=_service("detect"))
    networks: list[str] | None = field(default=None, metadata=_service("network_ids"))
    device: Literal["auto", "cpu", "cuda", "mps"] = field(default="auto", metadata=_service("device"))
    mask: Literal["first", "consensus"] = field(default="first", metadata=_service("mask"))
    threshold: str | float = field(default="default", metadata=_service("threshold"))
    patient: dict[str, Any] = field(default_factory=dict, metadata=_service("patient"))
    masks: list[str] = field(default_factory=list)
    nodule_ids: list[int] | None = field(default=None, metadata=_service("nodule_ids"))
    size_corrections: list[dict[str, Any] | None] | None = field(default=None, metadata=_service("size_corrections"))
    overwrite: bool = False
    dicom_seg: bool = False
    dicom_sr: bool = False
    pictures: bool = True
    request_id: str = ""
    version: int = PROTOCOL_VERSION

    def __post_init__(self):
        for name in ("ct", "out"):  # paths given as Path objects are kept as text
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.masks, (list, tuple)):
            self.masks = [os.fspath(m) if isinstance(m, os.PathLike) else m for m in self.masks]
        self.validate()
        self.points_lps = [[float(v) for v in p] for p in self.points_lps]
        for name in ("networks", "nodule_ids"):
            if getattr(self, name) is not None:
                setattr(self, name, list(getattr(self, name)))

    # --- checks ---------------------------------------------------------------

    def validate(self) -> AnalysisRequest:
        """Check every field's type (from its annotation) and the mode's required inputs.

        Raises:
            ProtocolError: the first problem, as one line.
        """
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _conforms(value, hints[f.name]):
                raise ProtocolError(f"request field {f.name!r}: {_describe(value)} is not {_type_text(hints[f.name])}")
        if self.version != PROTOCOL_VERSION:
            raise ProtocolError(f"request has protocol version {self.version}; this worker speaks {PROTOCOL_VERSION}")
        if not self.ct or not self.out:
            raise ProtocolError("request needs 'ct' and 'out'")
        if any(len(p) != 3 or not all(math.isfinite(v) for v in p) for p in self.points_lps):
            raise ProtocolError(f"request field 'points_lps': each point needs three finite numbers, got {self.points_lps}")
        if self.mode == "reclassify" and not self.masks:
            raise ProtocolError("a 'reclassify' request needs 'masks' (one mask file per nodule)")
        if self.mode == "analyze" and self.masks:
            raise ProtocolError("'masks' belong to a 'reclassify' request")
        return self

    def service_kwargs(self, function) -> dict[str, Any]:
        """Keyword arguments of the service ``function`` taken from this request: every field
        whose metadata names a ``service`` parameter that ``function`` accepts.

        Raises:
            ProtocolError: a field was set (differs from its default) but ``function`` has no
                such parameter (e.g. ``detect`` in a ``reclassify`` request).
        """
        import inspect

        params = inspect.signature(function).parameters
        out = {}
        for f in dataclasses.fields(self):
            name = f.metadata.get("service")
            if name is None:
                continue
            value = getattr(self, f.name)
            if name in params:
                out[name] = value
            elif value != _default(f):
                raise ProtocolError(f"request field {f.name!r} does not apply to a {self.mode!r} request")
        if "points_lps" in out:
            out["points_lps"] = [tuple(float(v) for v in p) for p in out["points_lps"]] or None
        return out

    # --- JSON -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """One line of JSON (no newline inside)."""
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any) -> AnalysisRequest:
        """Build and check a request from decoded JSON.

        Raises:
            ProtocolError: not an object, unknown or missing keys, bad values (see :meth:`validate`).
        """
        if not isinstance(data, dict):
            raise ProtocolError(f"a request is a JSON object, got {_describe(data)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ProtocolError(f"unknown request field(s): {', '.join(unknown)}")
        if data.get("version", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise ProtocolError(f"request has protocol version {data.get('version')!r}; this worker speaks {PROTOCOL_VERSION}")
        missing = [n for n in ("mode", "ct", "out") if n not in data]
        if missing:
            raise ProtocolError(f"request field(s) missing: {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def from_json(cls, line: str) -> AnalysisRequest:
        """Parse one request line. Raises ProtocolError (not JSON, or as :meth:`from_dict`)."""
        return cls.from_dict(_loads(line, "request"))


# ---------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    """Progress of the running request: ``fraction`` in [0, 1], optional ``message``."""

    kind: ClassVar[str] = "progress"
    fraction: float
    message: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class Message:
    """A line for the user (``level``: ``"info"``, ``"warning"`` e.g. the CPU retry, ``"note"``)."""

    kind: ClassVar[str] = "message"
    text: str
    level: str = "info"
    request_id: str = ""


@dataclass(frozen=True)
class Result:
    """Terminal: the request succeeded; its complete outputs are in ``out``."""

    kind: ClassVar[str] = "result"
    out: str
    files: list[str] = field(default_factory=list)
    n_nodules: int = 0
    n_found: int = 0
    device: str = ""
    seconds: float = 0.0
    request_id: str = ""


@dataclass(frozen=True)
class Error:
    """Terminal: the request failed; ``message`` is one readable line, nothing was written."""

    kind: ClassVar[str] = "error"
    message: str
    error_type: str = ""
    exit_code: int = 1
    request_id: str = ""


#: Event kind -> class.
EVENT_TYPES: dict[str, type] = {cls.kind: cls for cls in (Progress, Message, Result, Error)}
Event = Progress | Message | Result | Error
#: Event kinds that end a request.
TERMINAL = ("result", "error")


def encode_event(event: Event) -> str:
    """One JSON line for ``event`` (``version`` and ``event`` keys added)."""
    return json.dumps({"version": PROTOCOL_VERSION, "event": event.kind, **dataclasses.asdict(event)}, allow_nan=False)


def decode_event(line: str) -> Event:
    """Parse one event line.

    Raises:
        ProtocolError: not JSON, another version, unknown kind, unknown or missing fields.
    """
    data = _loads(line, "event")
    if not isinstance(data, dict):
        raise ProtocolError(f"an event is a JSON object, got {_describe(data)}")
    if data.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(f"event has protocol version {data.get('version')!r}; expected {PROTOCOL_VERSION}")
    cls = EVENT_TYPES.get(data.get("event"))
    if cls is None:
        raise ProtocolError(f"unknown event {data.get('event')!r}")
    body = {k: v for k, v in data.items() if k not in ("version", "event")}
    try:
        event = cls(**body)
    except TypeError as e:
        raise ProtocolError(f"bad {cls.kind} event: {e}") from None
    hints = _hints(cls)
    for f in dataclasses.fields(event):
        if not _conforms(getattr(event, f.name), hints[f.name]):
            raise ProtocolError(f"{cls.kind} event field {f.name!r}: {_describe(getattr(event, f.name))}")
    return event


# ---------------------------------------------------------------------------
# helpers: type checks from the annotations
# ---------------------------------------------------------------------------

def _loads(line: str, what: str):
    try:
        return json.loads(line)
    except (json.JSONDecodeError, TypeError) as e:
        raise ProtocolError(f"the {what} is not JSON: {e}") from None


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _conforms(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_conforms(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_text(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_text(args[0])}" if args else "a list"
    if origin is dict:
        return "an object"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}.get(hint, str(hint))


def _describe(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
