"""The ``nodulemtl review`` web app: NoduleMTL findings reviewed in Slicer's slice views in a browser.

Built on Kitware's trame-slicer (Slicer's MRML scene, slice views and segment-editor effects
served by trame): an axial view (large) with coronal and sagittal views, lung / mediastinum
window presets, the findings table, a click tool that analyses the nodule under the cursor,
"Find nodules", accept / reject / undecided per finding with keyboard shortcuts, outline
refinement with the paint / erase / scissors / islands effects and re-classification, and
export.

One MRML layer: results become a segmentation + table with :func:`NoduleMTLMRML.add_result_to_scene`
(the Slicer module's names, colours, terminology and tags), edited segments are re-classified with
:func:`NoduleMTLMRML.reclassification_request` / :func:`NoduleMTLMRML.apply_reclassification`, and
exported through :func:`NoduleMTLMRML.result_from_segmentation`.  Every analysis runs through the
one analysis service in the module's persistent worker (:class:`NoduleMTLLib.apps.runner.AnalysisProcess`
with a :class:`NoduleMTLLib.apps.worker.Worker`), warmed up in the background when the page opens.

Safety: binds 127.0.0.1 unless told otherwise (another host prints a warning); the page can open
and write only under the folders given on the command line; a bad file gives a message in the
page and the server keeps running.  See ``docs/review.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import traceback
from collections import deque
from pathlib import Path

# Headless rendering through EGL (Debian's Mesa); must be set before VTK creates a window.
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import slicer  # noqa: E402
from trame.app import TrameApp  # noqa: E402
from trame.widgets import client, html  # noqa: E402
from trame.widgets import vuetify3 as v3  # noqa: E402
from trame_slicer.core import LayoutManager, SlicerApp, VolumeWindowLevel  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402
from trame_slicer.segmentation import (  # noqa: E402
    SegmentationEffectErase,
    SegmentationEffectIslands,
    SegmentationEffectPaint,
    SegmentationEffectScissors,
)
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition  # noqa: E402
from trame_vuetify.ui.vuetify3 import SinglePageLayout  # noqa: E402
from undo_stack import UndoStack  # noqa: E402

import NoduleMTLMRML  # noqa: E402
from NoduleMTLLib.apps.runner import AnalysisProcess  # noqa: E402
from NoduleMTLLib.apps.worker import Worker  # noqa: E402
from NoduleMTLLib.core.io import InputError, lps_to_ras, read_ct  # noqa: E402
from NoduleMTLLib.core.results import AnalysisResult  # noqa: E402
from NoduleMTLLib.models.registry import DEFAULT_NETWORK  # noqa: E402

from .export import write_review_outputs  # noqa: E402
from .state import ACCEPTED, REJECTED, UNDECIDED, Finding, PathGuard, ReviewState, finding_row  # noqa: E402

log = logging.getLogger("nodulemtl.review")

#: Window presets (window, level) in HU.
WINDOW_PRESETS = {"lung": (1500.0, -600.0), "mediastinum": (400.0, 40.0)}
#: Field of view (mm) of a slice view's shorter side when the views are centred on a finding or point.
FOCUS_FOV_MM = 90.0
#: Tools of the slice views.
TOOLS = ("navigate", "click", "paint", "erase", "scissors")
#: The layout: axial view large on the left, coronal and sagittal stacked on the right.
LAYOUT_ID = "NoduleMTL review"
#: Keyboard shortcuts (key -> action), shown in the help overlay.
SHORTCUTS = (("n", "next finding"), ("p", "previous finding"), ("a", "accept the selected finding"),
             ("r", "reject the selected finding"), ("u", "set the selected finding back to undecided"),
             ("z", "undo the last status change"), ("y", "redo"), ("c", "click tool (analyse a nodule)"),
             ("Esc", "navigate (no tool)"), ("?", "this help"))

KEY_SCRIPT = """
window.addEventListener('keydown', function (e) {
  const t = e.target;
  if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) { return; }
  if (e.ctrlKey || e.metaKey || e.altKey) { return; }
  if (['n', 'p', 'a', 'r', 'u', 'z', 'y', 'c', '?', 'Escape'].includes(e.key) && window.trame) {
    e.preventDefault();
    window.trame.trigger('nodulemtl_key', [e.key]);
  }
});
"""


class ReviewApp(TrameApp):
    """The review web app (one scene, one review, one worker per server).

    Args:
        server: a trame server (None: the default one).
        roots: folders the page may read from and export to.
        networks: network ids for click analysis (default the registry's default network).
        device: compute device for the worker (auto / cpu / cuda / mps).
        warm_up: warm the worker and default network when the page opens.
    """

    def __init__(self, server=None, roots=(), networks=None, device: str = "auto", warm_up: bool = True):
        super().__init__(server, client_type="vue3")
        self.guard = PathGuard(roots)
        self.networks = list(networks or [DEFAULT_NETWORK])
        self.device = device
        self.warm_up_enabled = warm_up
        self.review = ReviewState()
        self.worker = Worker()
        self.ct = None  # CTVolume of the open CT (source + DICOM UID kept for export)
        self.ct_path: Path | None = None
        self.volume = None
        self.jobs: deque = deque()
        self.job: AnalysisProcess | None = None
        self.job_kind = ""
        self.job_meta: dict = {}
        self.warmed = False
        self._tmp = Path(tempfile.mkdtemp(prefix="nodulemtl-review-"))
        self._poller = None
        self._moved = False  # the views were moved (no automatic fit any more)

        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        self.layout_manager.register_layout(LAYOUT_ID, Layout(LayoutDirection.Horizontal, [
            ViewLayoutDefinition.axial_view(),
            Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view()]),
        ], flex_sizes=["2", "1"]))
        self.layout_manager.set_layout(LAYOUT_ID)
        try:  # the Slicer module's terminology context (same category / type codes)
            NoduleMTLMRML.register_terminology(self.slicer.terminologies_logic)
        except Exception as e:  # noqa: BLE001 - the segments still get the codes (see register_terminology)
            log.warning(f"NoduleMTL terminology context not loaded: {e}")
        self.editor = self.slicer.segmentation_editor
        self.editor.set_undo_stack(UndoStack(undo_limit=50))
        self.clicks = self.slicer.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "NoduleMTL clicks")
        self.clicks.AddObserver(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._on_point_placed)

        s = self.state
        s.trame__title = "NoduleMTL review"
        s.setdefault("findings", [])
        s.update({"message": "", "error": "", "ct_name": "", "open_path": "", "export_path": "", "overwrite": False,
                  "tool": "navigate", "busy": False, "progress": 0, "job_text": "", "worker_text": "Worker: not started",
                  "worker_ready": False, "show_help": False, "goto_ras": "", "counts": "", "current": None,
                  "can_undo": False, "can_redo": False, "preset": "lung", "exported": []})
        self.server.controller.on_client_connected.add(self._on_client_connected)
        self.server.controller.on_server_ready.add(self._on_server_ready)
        self.server.trigger("nodulemtl_key")(self.on_key)
        self.server.trigger("nodulemtl_view_info")(self.view_info)
        self.server.trigger("nodulemtl_select")(self.select_finding)
        self.server.trigger("nodulemtl_status")(self.set_status)
        self.state.change("tool")(self._on_tool)
        self.state.change("preset")(self._on_preset)
        self._build_ui()

    # ------------------------------------------------------------------ UI
    def _build_ui(self):
        with SinglePageLayout(self.server, full_height=True) as self.ui:
            self.ui.title.set_text("NoduleMTL review")
            self.ui.root.theme = "dark"
            client.Script(KEY_SCRIPT)
            client.Style(".nm-table td, .nm-table th {padding: 2px 6px; font-size: 12px; white-space: nowrap}"
                         ".nm-table tr.nm-sel {background: #37474f} .nm-table tr {cursor: pointer}"
                         ".nm-accepted {color: #66bb6a} .nm-rejected {color: #ef5350} .nm-undecided {color: #bdbdbd}"
                         "html { overflow-y: hidden; }")
            with self.ui.toolbar:
                v3.VSpacer()
                v3.VTextField(v_model=("open_path",), label="CT file or DICOM folder", density="compact",
                              hide_details=True, style="max-width: 320px", id="nm-open-path")
                v3.VBtn("Open", click=self.open_from_page, id="nm-open", variant="tonal", classes="mx-1")
                with v3.VBtnToggle(v_model=("preset",), density="compact", mandatory=True, classes="mx-2"):
                    v3.VBtn("Lung", value="lung", id="nm-preset-lung")
                    v3.VBtn("Mediastinum", value="mediastinum", id="nm-preset-mediastinum")
                with v3.VBtnToggle(v_model=("tool",), density="compact", mandatory=True, classes="mx-2"):
                    v3.VBtn("Navigate", value="navigate", id="nm-tool-navigate")
                    v3.VBtn("Click", value="click", id="nm-tool-click", prepend_icon="mdi-target")
                    v3.VBtn("Paint", value="paint", id="nm-tool-paint")
                    v3.VBtn("Erase", value="erase", id="nm-tool-erase")
                    v3.VBtn("Scissors", value="scissors", id="nm-tool-scissors")
                v3.VBtn("Help (?)", click="show_help = true", variant="text", id="nm-help")
            with self.ui.content:
                with html.Div(style="display: flex; flex-direction: row; height: calc(100vh - 90px); width: 100%"):
                    with html.Div(style="flex: 1 1 62%; position: relative; min-width: 0", id="nm-views"):
                        self.layout_manager.initialize_layout_grid(self.ui)
                    with html.Div(style="flex: 0 0 38%; overflow-y: auto; padding: 6px", id="nm-panel"):
                        self._build_panel()
            with v3.VDialog(v_model=("show_help",), max_width=520):
                with v3.VCard(title="Keyboard shortcuts", id="nm-help-card"):
                    with v3.VCardText():
                        with html.Table():
                            for key, what in SHORTCUTS:
                                with html.Tr():
                                    html.Td(html.Kbd(key), style="padding-right: 12px")
                                    html.Td(what)
                        html.P("Click tool: click a nodule in any slice view to analyse it.  Paint / Erase / Scissors "
                               "edit the selected finding's outline; then Re-classify.  Scroll: mouse wheel; "
                               "zoom: right-drag; pan: middle-drag or shift-drag.", classes="mt-2")
                    with v3.VCardActions():
                        v3.VBtn("Close", click="show_help = false")

    def _build_panel(self):
        html.Div("{{ ct_name || 'No CT open' }}", classes="text-subtitle-1", id="nm-ct-name")
        html.Div("{{ worker_text }}", classes="text-caption", id="nm-worker")
        v3.VAlert(v_if=("error",), text=("error",), type="error", density="compact", closable=True,
                  click_close="error = ''", id="nm-error", classes="my-1")
        html.Div("{{ message }}", v_if=("message",), classes="text-body-2 my-1", id="nm-message")
        with html.Div(classes="d-flex flex-row align-center my-1"):
            v3.VBtn("Find nodules", click=self.find_nodules, disabled=("busy || !ct_name",), id="nm-find", size="small",
                    classes="mr-1")
            v3.VBtn("Cancel", click=self.cancel_job, disabled=("!busy",), id="nm-cancel", size="small", classes="mr-1")
            v3.VBtn("Re-classify", click=self.reclassify_current, disabled=("busy || current === null",),
                    id="nm-reclassify", size="small", classes="mr-1")
            v3.VBtn("Keep largest island", click=self.keep_largest_island, disabled=("current === null",),
                    id="nm-islands", size="small", classes="mr-1")
        with html.Div(classes="d-flex flex-row align-center my-1"):
            v3.VBtn("Undo edit", click=self.undo_edit, id="nm-undo-edit", size="x-small", classes="mr-1")
            v3.VBtn("Redo edit", click=self.redo_edit, id="nm-redo-edit", size="x-small", classes="mr-1")
            v3.VTextField(v_model=("goto_ras",), label="Go to R, A, S (mm)", density="compact", hide_details=True,
                          id="nm-goto", style="max-width: 200px", keydown_enter=self.goto_from_page)
            v3.VBtn("Go", click=self.goto_from_page, id="nm-goto-btn", size="small", classes="ml-1")
        v3.VProgressLinear(v_if=("busy",), model_value=("progress",), height=6, color="primary", id="nm-progress")
        html.Div("{{ job_text }}", v_if=("busy",), classes="text-caption", id="nm-job")
        with html.Div(style="overflow-x: auto"), html.Table(classes="nm-table my-2", id="nm-findings"):
            with html.Thead():
                with html.Tr():
                    for title, tip in (("Id", "finding number"), ("Status", "accepted / rejected / undecided"),
                                       ("Axes mm", "long × short axis (axial), mm"), ("Type", "solid / part-solid / ground-glass"),
                                       ("Lung-RADS", "category, baseline rules"), ("P(mal.)", "reported P(malignant)"),
                                       ("Signs", "signs with probability >= 0.5"),
                                       ("Disagr.", "consensus disagreement between networks"), ("Score", "detection score")):
                        html.Th(title, title=tip)
            with html.Tbody():
                with html.Tr(v_for="f in findings", key="f.id", click="trigger('nodulemtl_select', [f.id])",
                             classes=("f.selected ? 'nm-sel' : ''",), __properties=[("data_id", "data-finding-id"),
                                                                                     ("data_status", "data-status")],
                             data_id=("f.id",), data_status=("f.status",)):
                    html.Td("{{ f.id }}")
                    html.Td("{{ f.status }}", classes=("'nm-' + f.status",))
                    html.Td("{{ f.axes }}")
                    html.Td("{{ f.type }}")
                    html.Td("{{ f.lung_rads }}")
                    html.Td("{{ f.p_malignant === null ? '' : f.p_malignant.toFixed(2) }}")
                    html.Td("{{ f.signs }}")
                    html.Td("{{ f.disagreement }}")
                    html.Td("{{ f.detection_score === null ? '' : f.detection_score.toFixed(2) }}")
        html.Div("{{ counts }}", classes="text-caption", id="nm-counts")
        with html.Div(classes="d-flex flex-row align-center my-1"):
            v3.VBtn("Accept (a)", click=(self.set_status, f"['{ACCEPTED}']"), disabled=("current === null",),
                    size="small", color="green", classes="mr-1", id="nm-accept")
            v3.VBtn("Reject (r)", click=(self.set_status, f"['{REJECTED}']"), disabled=("current === null",),
                    size="small", color="red", classes="mr-1", id="nm-reject")
            v3.VBtn("Undecided (u)", click=(self.set_status, f"['{UNDECIDED}']"), disabled=("current === null",),
                    size="small", classes="mr-1", id="nm-undecided")
        with html.Div(classes="d-flex flex-row align-center my-2"):
            v3.VTextField(v_model=("export_path",), label="Export folder", density="compact", hide_details=True,
                          id="nm-export-path")
            v3.VCheckbox(v_model=("overwrite",), label="replace", density="compact", hide_details=True,
                         id="nm-overwrite", style="max-width: 110px")
            v3.VBtn("Export", click=self.export_from_page, disabled=("busy || !findings.length",), id="nm-export",
                    size="small")
        html.Div("Exported: {{ exported.join(', ') }}", v_if=("exported.length",), classes="text-caption", id="nm-exported")
        html.Div("Research software, not for clinical use. " + NoduleMTLMRML.probability_legend(),
                 classes="text-caption mt-2", style="white-space: normal")

    # ------------------------------------------------------------ lifecycle
    def _on_server_ready(self, **_):
        if self._poller is None:
            self._poller = asyncio.ensure_future(self._poll_loop())

    def _on_client_connected(self, **_):
        if self._poller is None:
            self._poller = asyncio.ensure_future(self._poll_loop())
        self._maybe_warm_up()
        for delay in (1.0, 3.0):  # once the page has sized the views
            asyncio.get_event_loop().call_later(delay, self._fit_views)

    def _fit_views(self):
        if self.volume is not None and not self.review.findings and not self._moved:
            self.slicer.display_manager.reset_views()

    async def _poll_loop(self):
        while True:
            await asyncio.sleep(0.15)
            try:
                with self.state:
                    self._poll()
            except Exception as e:  # noqa: BLE001 - the server keeps running; the page says why
                log.error(traceback.format_exc())
                with self.state:
                    self.state.error = f"{type(e).__name__}: {e}"

    def close(self):
        """Stop the worker and delete the private temporary folder."""
        if self.job is not None and self.job.running:
            self.job.cancel()
        self.worker.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------------ CT
    def open_ct(self, path) -> None:
        """Open a CT file or DICOM folder (replacing the open one and its findings).

        Raises:
            InputError: unreadable / not a CT (the open CT stays).
        """
        ct = read_ct(path)
        import SimpleITK as sitk

        tmp = self._tmp / f"ct{len(list(self._tmp.iterdir()))}.nrrd"
        sitk.WriteImage(ct.image, str(tmp), False)
        volumes = self.slicer.io_manager.load_volumes([str(tmp)])
        if not volumes:
            raise InputError(f"{path}: could not be loaded into the scene")
        self._clear_findings()
        if self.volume is not None:
            self.slicer.scene.RemoveNode(self.volume)
        self.volume = volumes[0]
        self.volume.SetName(Path(path).name.split(".")[0] or "CT")
        self.ct, self.ct_path = ct, Path(path)
        self.slicer.display_manager.show_volume(self.volume, do_reset_views=True)
        self._moved = False
        self._on_preset(self.state.preset)
        self.state.ct_name = f"{Path(path).name}  ({' × '.join(str(v) for v in ct.image.GetSize())} voxels)"
        self.state.export_path = str(self._default_export_dir())
        self._maybe_warm_up()  # once per worker: the loaded network serves every CT

    def _default_export_dir(self) -> Path:
        root = self.guard.roots[0] if self.guard.roots else Path.cwd()
        stem = (self.ct_path.name.split(".")[0] if self.ct_path else "review") or "review"
        return root / f"{stem}_review"

    def open_from_page(self):
        try:
            p = self.guard.check(self.state.open_path)
            self.open_ct(p)
            self.state.error = ""
            self.state.message = f"Opened {p}"
        except (InputError, OSError, ValueError, RuntimeError) as e:
            self.state.error = f"Cannot open {self.state.open_path}: {e}"
        self._refresh_table()

    def open_results(self, folder) -> None:
        """Reopen an earlier output folder (nodules.json + labels): its findings and review statuses."""
        import json

        from NoduleMTLLib.outputs.files import read_outputs

        res = read_outputs(folder)
        statuses = {}
        try:
            for d in json.loads((Path(folder) / "nodules.json").read_text()).get("nodules", []):
                if d.get("review_status"):
                    statuses[int(d["id"])] = d["review_status"]
        except (OSError, ValueError):
            pass
        ids = self._add_result(res)
        for old_id, new_id in ids.items():
            if old_id in statuses:
                self.review.get(new_id).status = statuses[old_id]
        self._refresh_table()

    # --------------------------------------------------------------- views
    def _slice_views(self):
        return self.slicer.view_manager.get_slice_views()

    def _slice_node(self, name: str):
        for v in self._slice_views():
            node = v.get_view_node()
            if node is not None and (node.GetName() == name or node.GetLayoutName() == name
                                     or node.GetOrientation() == name):
                return v, node
        return None, None

    def view_info(self, name: str = "Red") -> dict:
        """Geometry of a slice view for clients and tests: the slice node's XY-to-RAS matrix
        (row-major 4x4; XY = render-window pixels, origin bottom-left) and the view size (pixels)."""
        view, node = self._slice_node(name)
        if node is None:
            return {}
        m = node.GetXYToRAS()
        w, h = view.render_window().GetSize()
        return {"xy_to_ras": [m.GetElement(r, c) for r in range(4) for c in range(4)], "size": [w, h],
                "dimensions": list(node.GetDimensions())}

    def center_on(self, ras) -> None:
        """Centre the three slice views on a point (R, A, S mm), zoomed so that the shorter side of
        each view spans :data:`FOCUS_FOV_MM`."""
        r, a, s = (float(v) for v in ras)
        self._moved = True
        for v in self._slice_views():
            node = v.get_view_node()
            if node is not None:
                w, h = (max(1, int(d)) for d in node.GetDimensions()[:2])
                fov = node.GetFieldOfView()
                k = FOCUS_FOV_MM / min(w, h)  # mm per pixel: the view's shorter side spans FOCUS_FOV_MM
                node.SetFieldOfView(w * k, h * k, fov[2])
                node.JumpSliceByCentering(r, a, s)
                v.schedule_render()

    def _render_all(self) -> None:
        for v in self._slice_views():
            v.schedule_render()

    def goto_from_page(self, *_):
        try:
            parts = [float(t) for t in str(self.state.goto_ras).replace(",", " ").split()]
            if len(parts) != 3:
                raise ValueError("three numbers R A S (mm) are needed")
            self.center_on(parts)
            self.state.error = ""
        except ValueError as e:
            self.state.error = f"Go to: {e}"

    def _on_preset(self, preset, **_):
        if self.volume is None or preset not in WINDOW_PRESETS:
            return
        w, lvl = WINDOW_PRESETS[preset]
        VolumeWindowLevel.set_volume_node_window_level(self.volume, w, lvl)

    # --------------------------------------------------------------- tools
    def _on_tool(self, tool, **_):
        ml = self.slicer.markups_logic
        try:
            ml.disable_place_mode()
        except Exception:  # noqa: BLE001 - no interaction node yet
            pass
        self.editor.deactivate_effect()
        if tool == "click":
            if self.volume is None:
                self.state.error = "Open a CT first"
                return
            ml.place_node(self.clicks, persistent=True)
        elif tool in ("paint", "erase", "scissors"):
            f = self._current_finding()
            if f is None:
                self.state.error = "Select a finding to edit its outline"
                self.state.tool = "navigate"
                return
            self._activate_segment(f)
            effect = {"paint": SegmentationEffectPaint, "erase": SegmentationEffectErase,
                      "scissors": SegmentationEffectScissors}[tool]
            eff = self.editor.set_active_effect_type(effect)
            if tool in ("paint", "erase") and eff is not None:
                from trame_slicer.segmentation import BrushDiameterMode

                eff.set_brush_diameter(8.0, BrushDiameterMode.Absolute)  # mm

    def _current_finding(self) -> Finding | None:
        try:
            return self.review.get(self.review.current) if self.review.current is not None else None
        except KeyError:
            return None

    def _activate_segment(self, f: Finding) -> None:
        seg = self.slicer.scene.GetNodeByID(f.segmentation_node_id)
        self.editor.set_active_segmentation(seg, self.volume)
        self.editor.set_surface_representation_enabled(False)
        self.editor.set_active_segment_id(f.segment_id)

    def keep_largest_island(self):
        f = self._current_finding()
        if f is None:
            return
        self._activate_segment(f)
        eff = self.editor.set_active_effect_type(SegmentationEffectIslands)
        eff.keep_largest_island()
        self.editor.deactivate_effect()
        self.state.tool = "navigate"
        self.state.message = f"Finding {f.id}: kept the largest island; Re-classify to update its values"

    def undo_edit(self):
        if self.editor.undo_stack is not None and self.editor.undo_stack.can_undo():
            self.editor.undo_stack.undo()

    def redo_edit(self):
        if self.editor.undo_stack is not None and self.editor.undo_stack.can_redo():
            self.editor.undo_stack.redo()

    # ------------------------------------------------------------ analysis
    def _on_point_placed(self, caller, _event):
        n = caller.GetNumberOfControlPoints()
        if n == 0:
            return
        ras = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(n - 1, ras)
        caller.RemoveAllControlPoints()
        with self.state:
            self.analyse_point(ras)

    def analyse_point(self, ras) -> None:
        """Queue the analysis of the nodule at ``ras`` (R, A, S mm) in the worker."""
        if self.ct_path is None:
            self.state.error = "Open a CT first"
            return
        lps = (-float(ras[0]), -float(ras[1]), float(ras[2]))
        self.jobs.append(("click", {"points": [lps], "ras": tuple(float(v) for v in ras)}))
        self.state.message = "Analysing the nodule at R {:.1f}, A {:.1f}, S {:.1f} ...".format(*ras)
        self._start_next()

    def find_nodules(self):
        if self.ct_path is None:
            self.state.error = "Open a CT first"
            return
        self.jobs.append(("detect", {}))
        self._start_next()

    def reclassify_current(self):
        f = self._current_finding()
        if f is None:
            return
        try:
            seg = self.slicer.scene.GetNodeByID(f.segmentation_node_id)
            req = NoduleMTLMRML.reclassification_request(self.slicer.scene, seg, f.segment_id, self.volume)
        except (ValueError, InputError) as e:
            self.state.error = str(e)
            return
        self.editor.deactivate_effect()
        self.state.tool = "navigate"
        self.jobs.append(("reclassify", {"finding": f.id, "request": req}))
        self._start_next()

    def _maybe_warm_up(self):
        """Warm the worker and the default network with one throw-away analysis at the CT's centre."""
        if not self.warm_up_enabled or self.warmed or self.ct is None:
            return
        if any(kind == "warmup" for kind, _ in self.jobs) or self.job_kind == "warmup":
            return
        size = self.ct.image.GetSize()
        centre = self.ct.image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in size])
        self.jobs.appendleft(("warmup", {"points": [tuple(centre)]}))
        self.state.worker_text = "Worker: warming up (loading the network) ..."
        self._start_next()

    def _start_next(self):
        if self.job is not None or not self.jobs:
            return
        kind, meta = self.jobs.popleft()
        nets = self.networks
        try:
            if kind == "reclassify":
                req = meta["request"]
                ct = NoduleMTLMRML.volume_node_to_ct(self.volume)
                job = AnalysisProcess(ct, [req["point_lps"]] if req["point_lps"] is not None else None,
                                      networks=req["network_ids"], device=self.device, temp_root=self._tmp,
                                      worker=self.worker, masks=[req["mask"]], nodule_ids=[req["nodule_id"]],
                                      options={"size_corrections": [req["size_correction"]]} if req.get("size_correction") else None)
            elif kind == "detect":
                job = AnalysisProcess(str(self.ct_path), None, detect=True, networks=nets, device=self.device,
                                      temp_root=self._tmp, worker=self.worker, options={"pictures": False})
            else:
                job = AnalysisProcess(str(self.ct_path), meta["points"], networks=nets, device=self.device,
                                      temp_root=self._tmp, worker=self.worker, options={"pictures": False})
            job.start()
        except Exception as e:  # noqa: BLE001 - a bad request must not stop the server
            self.state.error = f"Cannot start the {kind}: {e}"
            self.state.busy = False
            return
        self.job, self.job_kind, self.job_meta = job, kind, meta
        self.state.busy = kind != "warmup"
        self.state.progress = 0
        self.state.job_text = {"click": "Analysing the clicked nodule", "detect": "Find nodules",
                               "reclassify": "Re-classifying", "warmup": "Warming up"}[kind]

    def cancel_job(self):
        """Cancel the running analysis (and queued ones); the worker restarts with the next run."""
        self.jobs = deque(j for j in self.jobs if j[0] == "warmup")
        if self.job is not None and self.job_kind != "warmup":
            self.job.cancel()
            self.job = None
            self.job_kind = ""
            self.state.busy = False
            self.state.message = "Cancelled"
            self.warmed = False
            self.state.worker_ready = False
            self.state.worker_text = "Worker: stopped by the cancel"
            self._maybe_warm_up()  # a new worker, warmed again in the background

    def _poll(self):
        job = self.job
        if job is None:
            self._start_next()
            return
        job.poll()
        if job.running:
            self.state.progress = round(100 * float(job.progress or 0))
            if job.message:
                self.state.job_text = job.message
            return
        kind, meta = self.job_kind, self.job_meta
        self.job, self.job_kind, self.job_meta = None, "", {}
        self.state.busy = bool(self.jobs) and any(k != "warmup" for k, _ in self.jobs)
        try:
            if job.state != "succeeded":
                if kind == "warmup":
                    self.state.worker_text = f"Worker: warm-up failed ({job.error_text or job.state})"
                elif job.state != "cancelled":
                    self.state.error = f"The {kind} failed: {job.error_text or job.state}"
                return
            if kind == "warmup":
                self.warmed = True
                self.state.worker_ready = True
                self.state.worker_text = f"Worker: ready ({', '.join(self.networks)} loaded, {job.seconds:.1f} s)"
            elif kind in ("click", "detect"):
                res = job.result()
                added = self._add_result(res)
                if not added:
                    msg = "; ".join(n.message for n in res.nodules if n.message) or "no nodule"
                    self.state.message = ("No nodule found at the click: " if kind == "click" else "Find nodules: ") + msg
                else:
                    first = min(added.values())
                    self.review.select(first)
                    if kind == "click":
                        self.state.message = f"Finding {first} added ({job.seconds:.1f} s)"
                    else:
                        self.state.message = f"Find nodules: {len(added)} finding(s) ({job.seconds:.1f} s)"
            elif kind == "reclassify":
                res = job.result()
                f = self.review.get(meta["finding"])
                seg = self.slicer.scene.GetNodeByID(f.segmentation_node_id)
                nodule = res.nodules[0]
                nodule.id = f.id
                NoduleMTLMRML.apply_reclassification(seg, f.segment_id, meta["request"]["table"], nodule,
                                                     meta["request"]["network_ids"])
                self._assess(nodule)
                self.review.update_row(f.id, finding_row(nodule, meta["request"]["network_ids"]))
                self.state.message = f"Finding {f.id} re-classified from the edited outline ({job.seconds:.1f} s)"
        finally:
            job.cleanup()
            self._refresh_table()
            self._render_all()
            self._start_next()

    def _assess(self, nodule) -> None:
        """Lung-RADS of a re-classified outline for its row (the export recomputes it on the masks as well)."""
        try:
            from NoduleMTLLib.service.assessment import annotate_result, patient_for

            annotate_result(AnalysisResult(self.ct.describe(), {}, [nodule]), self.ct, patient_for(self.ct))
        except Exception as e:  # noqa: BLE001 - the row then shows no category; the values above stand
            log.warning(f"Lung-RADS not recomputed: {e}")

    def _add_result(self, res: AnalysisResult) -> dict[int, int]:
        """Add a result's found nodules to the scene (the Slicer module's MRML layer) as new findings.

        Nodule ids are renumbered to unique finding ids first, so segment names ("Nodule N"),
        tags and table rows match the findings table.  Returns {original id: finding id}.
        """
        found = [n for n in res.nodules if n.found and n.mask_box is not None]
        if not found:
            return {}
        next_id = self.review.next_id()
        mapping = {}
        res.nodules = found
        for k, n in enumerate(found):
            mapping[n.id] = next_id + k
            n.id = next_id + k
        seg, _table = NoduleMTLMRML.add_result_to_scene(self.slicer.scene, res, self.volume)
        nets = list((res.run or {}).get("networks") or [])
        segmentation = seg.GetSegmentation()
        for n in found:
            sid = segmentation.GetSegmentIdBySegmentName(n.name)  # names are unique: ids were renumbered
            if not sid:
                continue
            centre = seg.GetSegmentCenterRAS(sid)
            centre = tuple(float(v) for v in centre) if centre is not None else lps_to_ras(n.point_lps_mm)
            self.review.add(Finding(n.id, seg.GetID(), sid, centre, finding_row(n, nets)))
        return mapping

    def _clear_findings(self):
        for f in list(self.review.findings):
            node = self.slicer.scene.GetNodeByID(f.segmentation_node_id)
            if node is not None:
                table = node.GetNodeReference(NoduleMTLMRML.SEGMENT_TAG_PREFIX + "table")
                if table is not None:
                    self.slicer.scene.RemoveNode(table)
                self.slicer.scene.RemoveNode(node)
        self.review = ReviewState()

    # -------------------------------------------------------------- review
    def _refresh_table(self):
        self.state.findings = self.review.table_rows()
        self.state.current = self.review.current
        c = self.review.counts()
        self.state.counts = (f"{len(self.review.findings)} finding(s): {c[ACCEPTED]} accepted, {c[REJECTED]} rejected, "
                             f"{c[UNDECIDED]} undecided") if self.review.findings else ""

    def select_finding(self, finding_id):
        try:
            f = self.review.select(int(finding_id))
        except (KeyError, ValueError):
            return
        self.center_on(f.center_ras)
        self._refresh_table()

    def set_status(self, status):
        try:
            self.review.set_current_status(status)
        except ValueError as e:
            self.state.error = str(e)
        self._refresh_table()

    def on_key(self, key: str):
        r = self.review
        if key == "n" and r.step(+1) is not None:
            self.center_on(r.get(r.current).center_ras)
        elif key == "p" and r.step(-1) is not None:
            self.center_on(r.get(r.current).center_ras)
        elif key == "a":
            r.set_current_status(ACCEPTED)
        elif key == "r":
            r.set_current_status(REJECTED)
        elif key == "u":
            r.set_current_status(UNDECIDED)
        elif key == "z":
            r.undo()
        elif key == "y":
            r.redo()
        elif key == "c":
            self.state.tool = "click"
        elif key == "Escape":
            self.state.tool = "navigate"
            self.state.show_help = False
        elif key == "?":
            self.state.show_help = not self.state.show_help
        self._refresh_table()

    # -------------------------------------------------------------- export
    def current_result(self) -> AnalysisResult:
        """Every finding as it is now (edited masks, re-classified values), ids = finding ids."""
        nodules, run = [], None
        seen = set()
        for f in self.review.findings:
            if f.segmentation_node_id in seen:
                continue
            seen.add(f.segmentation_node_id)
            node = self.slicer.scene.GetNodeByID(f.segmentation_node_id)
            try:
                res = NoduleMTLMRML.result_from_segmentation(node, self.volume, self.ct)
            except ValueError:  # every segment of that node erased
                continue
            run = run or res.run
            nodules += res.nodules
        nodules.sort(key=lambda n: n.id)
        return AnalysisResult(self.ct.describe(), dict(run or {}), nodules)

    def export(self, folder, overwrite: bool = False) -> list[Path]:
        """Write the review into ``folder`` (inside the allowed folders); see
        :func:`NoduleMTLReview.export.write_review_outputs`."""
        out = self.guard.check(folder, must_exist=False)
        result = self.current_result()
        return write_review_outputs(result, self.review.statuses(), self.ct, out, overwrite=overwrite)

    def export_from_page(self):
        try:
            paths = self.export(self.state.export_path, overwrite=bool(self.state.overwrite))
            self.state.exported = sorted({p.name for p in paths})
            self.state.message = f"Exported to {Path(paths[0]).parent}" if paths else "Nothing exported"
            self.state.error = ""
        except Exception as e:  # noqa: BLE001 - OutputError, InputError...: say it in the page
            self.state.error = f"Export failed: {e}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nodulemtl review", description="Review NoduleMTL findings in a web browser (trame-slicer)")
    ap.add_argument("ct", nargs="?", help="CT file (.nrrd, .nii[.gz], .mha) or DICOM series folder to open")
    ap.add_argument("--results", help="reopen an earlier output folder (nodules.json + labels.nrrd)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: a free port)")
    ap.add_argument("--allow", action="append", default=[], metavar="DIR",
                    help="another folder the page may open files from and export to (repeatable)")
    ap.add_argument("--networks", default=DEFAULT_NETWORK, help=f"networks for click analysis (default {DEFAULT_NETWORK})")
    ap.add_argument("--device", default="auto", help="compute device: auto, cpu, cuda, mps")
    ap.add_argument("--no-warm-up", action="store_true", help="do not warm the worker when the page opens")
    return ap


def main(argv=None) -> int:
    """``nodulemtl review``: start the web app and print its URL.  Returns the exit code."""
    args = build_parser().parse_args(argv)
    roots = []
    ct_path = Path(args.ct).expanduser().resolve() if args.ct else None
    if ct_path is not None:
        if not ct_path.exists():
            print(f"nodulemtl review: error: {args.ct} not found", file=sys.stderr)
            return 2
        roots.append(ct_path if ct_path.is_dir() else ct_path.parent)
    results = Path(args.results).expanduser().resolve() if args.results else None
    if results is not None:
        if not (results / "nodules.json").is_file():
            print(f"nodulemtl review: error: {args.results} holds no nodules.json", file=sys.stderr)
            return 2
        roots.append(results)
    roots += [Path(d).expanduser().resolve() for d in args.allow]
    if not roots:
        roots.append(Path.cwd().resolve())
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"nodulemtl review: WARNING: binding {args.host}: anyone who can reach this machine can open the page, "
              "read CTs under the allowed folders and write exports. There is no login.", file=sys.stderr)
    from trame.app import get_server

    server = get_server("nodulemtl-review", client_type="vue3")
    app = ReviewApp(server, roots=roots, networks=[s for s in args.networks.split(",") if s], device=args.device,
                    warm_up=not args.no_warm_up)
    try:
        if results is not None and ct_path is None:
            import json

            src = json.loads((results / "nodules.json").read_text()).get("input", {}).get("path")
            if not src or not Path(src).exists():
                print(f"nodulemtl review: error: the CT of {results} ({src}) is not found; give it as CT", file=sys.stderr)
                return 2
            ct_path = Path(src).resolve()
        if ct_path is not None:
            app.open_ct(ct_path)
        if results is not None:
            app.open_results(results)
    except (InputError, OSError, ValueError) as e:
        print(f"nodulemtl review: error: {e}", file=sys.stderr)
        app.close()
        return 2
    print(f"NoduleMTL review: allowed folders: {', '.join(str(r) for r in roots)}", flush=True)
    try:
        server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=True,
                     timeout=0, disable_logging=True)
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
