"""NoduleMTL: click a pulmonary nodule on a chest CT, get its segmentation, measurements
and a malignancy estimate from multi-task networks.

3D Slicer scripted module (Module / Widget / Logic / Test).  The computation lives in
the pure-Python package ``NoduleMTLLib`` (no Slicer imports) and the scene conversion in
``NoduleMTLMRML`` (MRML only, no Qt).  This file holds the GUI and the glue.

Library discovery: ``NoduleMTLLib`` and ``Resources`` are found beside this file (the
installed / build-tree layout produced by ``NoduleMTL/CMakeLists.txt``) or in the parent
folder (the source layout: ``<repo>/NoduleMTL/NoduleMTL.py``, ``<repo>/NoduleMTLLib``,
``<repo>/Resources``), so the module also runs when ``<repo>/NoduleMTL`` is added as an
additional module path without building.
"""

import importlib
import importlib.util
import logging
import os
import shutil
import sys
import time

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# ---------------------------------------------------------------------------
# Library and resource discovery (installed layout or source layout)
# ---------------------------------------------------------------------------

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
_MODULE_NAME = "NoduleMTL"


def _candidateRoots():
    """Folders that may hold ``NoduleMTLLib/`` and ``Resources/``: beside this file
    (installed layout), then its parent (source layout)."""
    return (_MODULE_DIR, os.path.dirname(_MODULE_DIR))


def libraryRoot():
    """Folder that contains the ``NoduleMTLLib`` package, or None if it cannot be found."""
    for root in _candidateRoots():
        if os.path.isfile(os.path.join(root, "NoduleMTLLib", "__init__.py")):
            return root
    return None


def resourcesDir():
    """The module's ``Resources`` folder (the one holding ``UI/NoduleMTL.ui``)."""
    for root in _candidateRoots():
        candidate = os.path.join(root, "Resources")
        if os.path.isfile(os.path.join(candidate, "UI", _MODULE_NAME + ".ui")):
            return candidate
    return os.path.join(_MODULE_DIR, "Resources")


def resourcePath(filename):
    """Absolute path of ``filename`` inside the module's ``Resources`` folder."""
    return os.path.join(resourcesDir(), filename)


def _ensureImportPaths():
    # This folder (NoduleMTLMRML.py) and the folder holding NoduleMTLLib must be importable.
    # Put them first so that the extension's own copy wins over any other installed copy.
    for path in (libraryRoot(), _MODULE_DIR):
        if path and path not in sys.path:
            sys.path.insert(0, path)


_ensureImportPaths()

#: Default network (the measured default configuration, ``NoduleMTLLib.DEFAULT_NETWORKS``:
#: ``training/RESULTS.md``, "Calibrated malignancy and the default configuration") and device.
from NoduleMTLLib import DEFAULT_NETWORKS  # noqa: E402  (import paths set just above)

DEFAULT_NETWORK = DEFAULT_NETWORKS[0]
DEFAULT_DEVICE = "auto"

#: Python packages needed besides torch/torchvision: (import name, pip requirement).
#: SimpleITK and numpy are Slicer's own and are never (re)installed by this module;
#: torch and torchvision are installed only through the PyTorch extension.
PYTHON_REQUIREMENTS = (
    ("skimage", "scikit-image>=0.22"),
    ("scipy", "scipy"),
    ("safetensors", "safetensors>=0.4"),
    ("slicerio", "slicerio>=1.1"),
    ("nrrd", "pynrrd>=1.0"),
    ("tqdm", "tqdm>=4.66"),
    ("timm", "timm>=1.0"),  # MT-Net's aligned Xception / Xception blocks
    ("highdicom", "highdicom>=0.23"),  # DICOM SEG export
)
TORCH_VERSION_REQUIREMENT = ">=2.0"
TORCHVISION_VERSION_REQUIREMENT = ">=0.15"

#: How often the widget polls a background run (ms).
POLL_INTERVAL_MS = 200

_DISCLAIMER = "Research use only: not for clinical diagnosis."


def _runner():
    """``NoduleMTLLib.apps.runner`` (the background child process; no torch import)."""
    from NoduleMTLLib.apps import runner

    return runner


def _worker():
    """``NoduleMTLLib.apps.worker`` (the persistent background worker; no torch import)."""
    from NoduleMTLLib.apps import worker

    return worker


#: The persistent background worker of this Slicer session (``NoduleMTLLogic.backgroundWorker``).
_WORKER = None


def _analysis():
    """``NoduleMTLLib.service.analysis`` (the analysis service, network list, detector status; torch
    is imported only when an analysis runs)."""
    from NoduleMTLLib.service import analysis

    return analysis


def _text():
    """``NoduleMTLText`` (the panel's text: summary HTML, status line; plain Python)."""
    import NoduleMTLText

    return NoduleMTLText


#
# NoduleMTL
#

class NoduleMTL(ScriptedLoadableModule):
    """Module description (title, category, help, acknowledgements)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "NoduleMTL"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["NoduleMTL contributors"]
        self.parent.helpText = """
<p>Click pulmonary nodules on a chest CT and get, for each one, a segmentation, its size
(longest axial diameter, short axis, volume), mean density, a type estimate
(solid / part-solid / ground-glass) and a malignancy probability from multi-task deep
networks that segment and classify jointly.</p>
<ol>
<li><b>Inputs</b>: select the CT volume (Hounsfield units), then place one point near the
centre of each nodule in a slice view (Place button).</li>
<li><b>Settings</b>: check the networks (the mask comes from the first checked one) and
choose the device (auto uses the GPU when there is one; on GPU out-of-memory the run is
repeated on the CPU). <i>Import model...</i> adds a weights file received offline.</li>
<li><b>Apply</b>: the analysis runs in the background with a progress bar (Apply turns into
Cancel; cancelling leaves the scene unchanged). A new segmentation (one segment per nodule,
standard terminology, coloured by malignancy probability, results as segment tags) and a
results table are created under the CT's study. Existing segmentations are never
modified. <b>Find nodules</b> searches the whole scan instead (when the detector is installed).</li>
<li><b>Results</b>: click a table row to centre the views on that nodule. After editing a
segment in Segment Editor, <i>Re-classify from edited mask</i> recomputes its measurements
and probabilities; <i>Export for training</i> writes the case for fine-tuning.</li>
</ol>
<p>The first run may ask to install PyTorch (through the PyTorch extension) and a few
Python packages. Network weights ship with the extension; nothing is downloaded at run time.</p>
<p><b>""" + _DISCLAIMER + """</b> Malignancy probabilities are estimates of networks
trained on public research data (LIDC-IDRI), not a diagnosis.</p>
"""
        self.parent.acknowledgementText = """
<p>NoduleMTL implements the networks described in:</p>
<ul>
<li>Li Y. et al. LNMSNet: a multi-task deep learning network for pulmonary nodules
segmentation and malignancy classification. Front. Med. 2026. doi:10.3389/fmed.2026.1773338</li>
<li>Zhang J. et al. Detection-guided deep learning-based model with spatial regularization
for lung nodule segmentation. Quant. Imaging Med. Surg. 2024 (arXiv:2410.20154).</li>
<li>Li R., Honarvar Shakibaei Asli B. Multi-Task Deep Learning for Lung Nodule Detection and
Segmentation in CT Scans. Electronics 2026, 15(4), 736.</li>
<li>DSMT-Net: A Dual-Scale Multi-Task Learning Framework for Invasiveness Prediction of
Medium-Sized Pulmonary Nodules.</li>
<li>MT-Net: a multi-task network for joint lung nodule segmentation and classification
(coarse and fine segmentation networks with a mask-guided classification network), LIDC-IDRI.</li>
</ul>
<p>Training and test data: The Cancer Imaging Archive (TCIA; Clark K. et al., J. Digit.
Imaging 2013): LIDC-IDRI (Armato S.G. III et al., Med. Phys. 2011;38:915-931; CC BY 3.0)
and Lung-PET-CT-Dx (Li P. et al., 2020; CC BY 4.0). We thank the LIDC/IDRI and TCIA teams
and the patients who made their data available.</p>
<p>Built on 3D Slicer and its PyTorch extension.</p>
"""
        iconPath = resourcePath("Icons/NoduleMTL.png")
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)

    def resourcePath(self, filename):
        return resourcePath(filename)


#
# NoduleMTLParameterNode
#

@parameterNodeWrapper
class NoduleMTLParameterNode:
    """Parameters of the module (saved with the scene).

    inputVolume - CT volume to analyse (Hounsfield units).
    points - point list: one point placed near the centre of each nodule.
    networks - comma-separated ids of the networks to run (``NoduleMTLLib.models.registry.NETWORKS``);
        the first one's mask is reported.  Plain ``str`` because the list is only known
        at run time (the checkable list is filled and synchronised by the widget).
    device - "auto" (CUDA if available, else CPU), "cpu", "cuda" or "mps"; plain ``str``
        because "mps" is offered only where torch reports it (combo synchronised by the widget).
    detectionThreshold - minimum score of Find nodules in [0, 1); 0 = the default operating
        point (detector + false-positive reduction, chosen on validation scans).
    outputSegmentation - segmentation created by the last run.
    outputTable - results table created by the last run.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    points: vtkMRMLMarkupsFiducialNode
    networks: str = DEFAULT_NETWORK
    device: str = DEFAULT_DEVICE
    detectionThreshold: float = 0.0
    outputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode


#
# NoduleMTLWidget
#

class NoduleMTLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: inputs, settings, Apply / Cancel, Find nodules, results.

    Every decision (what to run, how to read progress, errors, the summary text) is in
    ``NoduleMTLLib.apps.runner`` and :class:`NoduleMTLLogic`; this class only moves values
    between widgets and those.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedPointsNode = None
        self._updatingGui = False
        #: The background run in progress (``NoduleMTLLib.apps.runner.AnalysisProcess``) and its input volume.
        self._job = None
        self._jobVolume = None
        self._jobLabel = ""
        #: Table row (0-based) of the nodule last clicked in the results table, or None.
        self._selectedRow = None
        self._timer = None

    def resourcePath(self, filename):
        return resourcePath(filename)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NoduleMTL.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # MRML widgets get the scene through the qMRMLWidget's mrmlSceneChanged signal (see the .ui).
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = NoduleMTLLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._onTimer)

        self._populateNetworks()
        self._populateDevices()

        # Point placement: several points in a row, one per nodule.
        self.ui.pointsPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.pointsPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.progressBar.hide()
        self.ui.malignancyLabel.text = ""
        self.ui.statusLabel.text = ""
        self.ui.legendLabel.text = self.logic.probabilityLegend()
        # the shipped operating points, quoted from the weights' manifest (never typed into the .ui)
        self.ui.detectionThresholdSpinBox.toolTip = _text().detection_threshold_tooltip(resourcePath("Weights/models.json"))
        self._registerTerminology()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.findNodulesButton.connect("clicked(bool)", self.onFindNodulesButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModelButton)
        self.ui.networksListWidget.connect("itemChanged(QListWidgetItem*)", self.onNetworkItemChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.pointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onPointsNodeChanged)
        self.ui.outputTableSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputTableChanged)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onResultsTableClicked)
        self.ui.reclassifyButton.connect("clicked(bool)", self.onReclassifyButton)
        self.ui.exportTrainingButton.connect("clicked(bool)", self.onExportTrainingButton)
        self.ui.exportReportButton.connect("clicked(bool)", self.onExportReportButton)

        self.initializeParameterNode()

    def _registerTerminology(self):
        """Load the "Lung nodule" terminology context (``Resources/NoduleMTL.term.json``) so
        new nodule segments carry it; a failure is logged, segments then get the same codes
        under Slicer's general anatomy context."""
        try:
            import NoduleMTLMRML
            NoduleMTLMRML.register_terminology(slicer.modules.terminologies.logic())
        except Exception as e:  # missing Terminologies module or unreadable file: not fatal
            logging.warning(f"NoduleMTL: terminology context not loaded: {e}")

    def cleanup(self):
        """Called when the application closes and the module widget is destroyed."""
        self._cancelJob()
        NoduleMTLLogic.stopBackgroundWorker()
        self.removeObservers()

    def enter(self):
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self.logic.warmUpBackgroundWorker()  # the first Apply does not pay for starting Python + torch

    def exit(self):
        """Called each time the user opens a different module (a background run goes on)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._observePointsNode(None)
        self.ui.pointsPlaceWidget.placeModeEnabled = False

    def onSceneStartClose(self, caller, event):
        self._cancelJob()  # its result would belong to a scene that is gone
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node -------------------------------------------------------

    def initializeParameterNode(self):
        """Ensure the parameter node exists and is observed; pick sensible defaults."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.points and self._parameterNode.inputVolume:
            # A point list ready for clicking: the whole workflow is "Place, click, Apply".
            pointsNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Nodule points")
            pointsNode.CreateDefaultDisplayNodes()
            self._parameterNode.points = pointsNode

    def setParameterNode(self, inputParameterNode):
        """Connect the GUI to a parameter node (and disconnect the previous one)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a SlicerParameterName property (see the .ui) are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        p = self._parameterNode
        self._updatingGui = True
        try:
            # networks (checkable list) and device (combo) are synchronised here, not through connectGui
            selected = _analysis().split_networks(p.networks if p else DEFAULT_NETWORK)
            for row in range(self.ui.networksListWidget.count):
                item = self.ui.networksListWidget.item(row)
                checked = item.data(qt.Qt.UserRole) in selected
                item.setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
            deviceIndex = self.ui.deviceComboBox.findText(p.device if p else DEFAULT_DEVICE)
            if deviceIndex >= 0:
                self.ui.deviceComboBox.currentIndex = deviceIndex
        finally:
            self._updatingGui = False
        pointsNode = p.points if p else None
        self.ui.pointsPlaceWidget.setCurrentNode(pointsNode)
        self._observePointsNode(pointsNode)
        self.onOutputTableChanged(p.outputTable if p else None)
        self._checkCanApply()

    def _observePointsNode(self, pointsNode):
        events = (
            slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointPositionUndefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
        )
        if self._observedPointsNode is pointsNode:
            return
        if self._observedPointsNode is not None:
            for event in events:
                self.removeObserver(self._observedPointsNode, event, self._checkCanApply)
        self._observedPointsNode = pointsNode
        if pointsNode is not None:
            for event in events:
                self.addObserver(pointsNode, event, self._checkCanApply)

    # --- settings ---------------------------------------------------------------

    def _populateNetworks(self):
        """One checkable item per registered click network; greyed out (with the reason)
        when its weights are missing.  Detectors are not listed (they run from Find nodules)."""
        self._updatingGui = True
        try:
            self.ui.networksListWidget.clear()
            for choice in self.logic.networkChoices():
                if choice.detection:
                    continue
                item = qt.QListWidgetItem(f"{choice.title} ({choice.network_id})")
                item.setData(qt.Qt.UserRole, choice.network_id)
                if choice.available:
                    item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
                    item.setToolTip(choice.paper)
                else:
                    item.setFlags(qt.Qt.ItemIsUserCheckable)  # shown, not enabled
                    item.setToolTip(f"Not available: {choice.reason}")
                item.setCheckState(qt.Qt.Unchecked)
                self.ui.networksListWidget.addItem(item)
        finally:
            self._updatingGui = False
        self._updateFindNodulesButton()

    def _populateDevices(self):
        self._updatingGui = True
        try:
            self.ui.deviceComboBox.clear()
            for name in self.logic.deviceChoices():
                self.ui.deviceComboBox.addItem(name)
            self.ui.deviceComboBox.toolTip = self.logic.deviceTooltip()
        finally:
            self._updatingGui = False

    def _checkedNetworks(self):
        ids = []
        for row in range(self.ui.networksListWidget.count):
            item = self.ui.networksListWidget.item(row)
            if item.checkState() == qt.Qt.Checked:
                ids.append(item.data(qt.Qt.UserRole))
        return ids

    def onNetworkItemChanged(self, item):
        if self._updatingGui or not self._parameterNode:
            return
        self._parameterNode.networks = ",".join(self._checkedNetworks())

    def onPointsNodeChanged(self, node):
        self.ui.pointsPlaceWidget.setCurrentNode(node)
        self._observePointsNode(node)
        self._checkCanApply()

    def onDeviceChanged(self, index):
        if self._updatingGui or not self._parameterNode or index < 0:
            return
        self._parameterNode.device = self.ui.deviceComboBox.itemText(index)

    def onImportModelButton(self):
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Import network weights", "",
                                              "Network weights (*.safetensors)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not import the model.", waitCursor=True):
            networkId, dest = self.logic.importModel(path)
            self._populateNetworks()
            self._onParameterNodeModified()
            slicer.util.infoDisplay(f"Imported the weights of '{networkId}' into\n{dest}", windowTitle="NoduleMTL")

    def _updateFindNodulesButton(self):
        ok, reason = self.logic.detectionStatus()
        self._detectionReady = ok
        self.ui.findNodulesButton.toolTip = reason
        self._checkCanApply()

    # --- run, poll, cancel --------------------------------------------------------

    def _checkCanApply(self, caller=None, event=None):
        p = self._parameterNode
        running = self._job is not None
        numberOfPoints = NoduleMTLLogic.numberOfDefinedPoints(p.points) if p and p.points else 0
        networks = _analysis().split_networks(p.networks) if p else []
        if running:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = f"Stop {self._jobLabel}; the scene stays as it was"
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = "Apply"
            if p and p.inputVolume and numberOfPoints > 0 and networks:
                self.ui.applyButton.toolTip = (f"Analyse {numberOfPoints} nodule(s) in '{p.inputVolume.GetName()}' "
                                               f"with {', '.join(networks)} (in the background)")
                self.ui.applyButton.enabled = True
            else:
                self.ui.applyButton.toolTip = "Select a CT volume, check a network and place one point on each nodule"
                self.ui.applyButton.enabled = False
        self.ui.findNodulesButton.enabled = bool(not running and p and p.inputVolume
                                                 and getattr(self, "_detectionReady", False))
        hasResult = bool(not running and p and p.outputSegmentation and p.inputVolume)
        self.ui.reclassifyButton.enabled = hasResult
        self.ui.exportTrainingButton.enabled = hasResult
        self.ui.exportReportButton.enabled = hasResult

    def _setRunning(self, running):
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = running
        if running:
            self.ui.pointsPlaceWidget.placeModeEnabled = False
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.settingsCollapsibleButton.enabled = not running
        self._checkCanApply()

    def _startJob(self, detect):
        p = self._parameterNode
        self.ui.statusLabel.text = "Checking Python packages..."
        if not self.logic.setupPythonRequirements(askConfirmation=True):
            self.ui.statusLabel.text = "Required Python packages are not installed."
            return
        networks = _analysis().split_networks(p.networks)
        self._job = self.logic.startAnalysis(p.inputVolume, None if detect else p.points, networks=networks,
                                             device=p.device, detect=detect,
                                             detectionThreshold=p.detectionThreshold)
        self._jobVolume = p.inputVolume
        self._jobLabel = "the nodule search" if detect else "the analysis"
        self.ui.statusLabel.text = f"Starting {self._jobLabel} on {p.device}..."
        self._setRunning(True)
        self._timer.start()

    def onApplyButton(self):
        """Apply starts the analysis in the background; while it runs the button cancels it."""
        if self._job is not None:
            self._cancelJob()
            return
        if not self._parameterNode:
            return
        with slicer.util.tryWithErrorDisplay("Nodule analysis failed.", waitCursor=True):
            self._startJob(detect=False)

    def onFindNodulesButton(self):
        if self._job is not None or not self._parameterNode:
            return
        with slicer.util.tryWithErrorDisplay("Nodule search failed.", waitCursor=True):
            self._startJob(detect=True)

    def _onTimer(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.poll():
            if event.kind == "progress":
                self.ui.progressBar.value = int(round(100 * event.fraction))
            elif event.kind == "message":
                self.ui.statusLabel.text = event.text
            elif event.kind in ("output", "log"):
                logging.info(f"NoduleMTL: {event.text}")
        if job.finished:
            self._timer.stop()
            self._finishJob()

    def _finishJob(self):
        job, volume = self._job, self._jobVolume
        self._job, self._jobVolume = None, None
        try:
            if job.state == "succeeded" and getattr(job, "reclassification", None) is not None:
                with slicer.util.tryWithErrorDisplay("Could not update the segments.", waitCursor=True):
                    results = self.logic.finishReclassification(job)
                    self.ui.malignancyLabel.text = NoduleMTLLogic.summaryHtml({"nodules": [r.to_dict() for r in results]})
                    self.ui.statusLabel.text = f"Re-classified {len(results)} nodule(s) from the edited mask(s)."
            elif job.state == "succeeded":
                with slicer.util.tryWithErrorDisplay("Could not add the results to the scene.", waitCursor=True):
                    segmentationNode, tableNode, result = self.logic.finishAnalysis(job, volume)
                    self._showResult(segmentationNode, tableNode, result)
            elif job.state == "failed":
                logging.error(f"NoduleMTL: {self._jobLabel} failed: {job.error_text}\n{job.details}")
                self.ui.statusLabel.text = f"Failed: {job.error_text}"
                slicer.util.errorDisplay(f"NoduleMTL: {self._jobLabel} failed.\n\n{job.error_text}",
                                         detailedText=job.details)
            else:
                self.ui.statusLabel.text = "Cancelled: the scene was not changed."
        finally:
            job.cleanup()
            self._setRunning(False)

    def _cancelJob(self):
        if self._job is None:
            return
        self._timer.stop()
        self._job.cancel()
        self._finishJob()

    def _showResult(self, segmentationNode, tableNode, result):
        p = self._parameterNode
        p.outputSegmentation = segmentationNode
        p.outputTable = tableNode
        segmentationNode.CreateClosedSurfaceRepresentation()  # show the nodules in 3D views too
        self._selectedRow = None
        self.ui.malignancyLabel.text = NoduleMTLLogic.summaryHtml(result)
        self.ui.statusLabel.text = NoduleMTLLogic.statusText(result, self.logic.lastRunSeconds)
        self.ui.legendLabel.text = self.logic.probabilityLegend()
        import NoduleMTLMRML
        self.ui.lungRadsLabel.text = NoduleMTLMRML.scan_lung_rads_text(getattr(result, "run", None))
        self._registerTerminology()
        self.ui.resultsCollapsibleButton.collapsed = False

    # --- results ------------------------------------------------------------------

    def onOutputTableChanged(self, node):
        self.ui.resultsTableView.setMRMLTableNode(node)
        self._selectedRow = None

    def onResultsTableClicked(self, index):
        """Centre the slice views on the nodule of the clicked row."""
        tableNode = self.ui.resultsTableView.mrmlTableNode()
        if tableNode is None or not index.isValid():
            return
        row = NoduleMTLLogic.tableRowFromViewRow(tableNode, index.row())
        if row is None:
            return
        self._selectedRow = row
        ras = self.logic.noduleCenterRAS(tableNode, row)
        if ras is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)

    def _selectedSegmentIds(self):
        """Segment of the selected table row, or every nodule segment of the output segmentation."""
        p = self._parameterNode
        return self.logic.noduleSegmentIds(p.outputSegmentation, p.outputTable, self._selectedRow)

    def onReclassifyButton(self):
        """Re-classify the selected (or every) segment from its edited mask in the background worker."""
        p = self._parameterNode
        if self._job is not None or not p:
            return
        with slicer.util.tryWithErrorDisplay("Re-classification failed.", waitCursor=True):
            if not self.logic.setupPythonRequirements(askConfirmation=True):
                return
            self._job = self.logic.startReclassification(p.outputSegmentation, self._selectedSegmentIds(), p.inputVolume,
                                                         p.outputTable, networks=_analysis().split_networks(p.networks),
                                                         device=p.device)
            self._jobVolume = p.inputVolume
            self._jobLabel = "the re-classification"
            self.ui.statusLabel.text = f"Re-classifying on {p.device}..."
            self._setRunning(True)
            self._timer.start()

    def onExportTrainingButton(self):
        p = self._parameterNode
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Export for training: output folder")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Export for training failed.", waitCursor=True):
            written = self.logic.exportSegmentsForTraining(p.outputSegmentation, self._selectedSegmentIds(),
                                                           p.inputVolume, folder)
            self.ui.statusLabel.text = f"Exported {len(written)} case(s) to {folder}."

    def onExportReportButton(self):
        p = self._parameterNode
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Export report: output folder")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Export report failed.", waitCursor=True):
            written = self.logic.exportReport(p.outputSegmentation, p.inputVolume, folder, p.outputTable)
            self.ui.statusLabel.text = f"Report written to {folder} ({len(written)} file(s))."


#
# NoduleMTLLogic
#

class NoduleMTLLogic(ScriptedLoadableModuleLogic):
    """Computation, usable from scripts without the GUI (raises exceptions on errors).

    Example (Slicer Python console)::

        import NoduleMTL
        logic = NoduleMTL.NoduleMTLLogic()
        logic.setupPythonRequirements(askConfirmation=False)
        # synchronous (scripts, tests): runs in this process
        seg, table, result = logic.process(getNode("CT"), getNode("Nodule points"), device="cpu")
        # background (what the panel does): a PythonSlicer child process
        job = logic.process(getNode("CT"), getNode("Nodule points"), waitForCompletion=False)
        ...  # job.poll() from a timer until job.finished
        seg, table, result = logic.finishAnalysis(job, getNode("CT"))
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        #: Wall-clock seconds of the last finished run (analysis + scene update).
        self.lastRunSeconds = None

    def getParameterNode(self):
        return NoduleMTLParameterNode(super().getParameterNode())

    # --- networks, devices, models -------------------------------------------

    @staticmethod
    def networkChoices():
        """``NoduleMTLLib.service.analysis.network_choices()`` (every registered network, with whether
        its weights are present); only the default network while torch is not installed."""
        analysis = _analysis()
        try:
            return analysis.network_choices()
        except ImportError as e:  # torch not installed yet
            logging.info(f"NoduleMTL: network registry not importable yet ({e}); offering '{DEFAULT_NETWORK}'")
            return [analysis.NetworkChoice(DEFAULT_NETWORK, DEFAULT_NETWORK, "", True, "", False)]

    @staticmethod
    def availableNetworks():
        """``[(network id, title), ...]`` of the click networks whose weights are present."""
        return [(c.network_id, c.title) for c in NoduleMTLLogic.networkChoices() if c.available and not c.detection]

    @staticmethod
    def deviceChoices():
        """auto / cpu / cuda, plus mps where torch reports it."""
        from NoduleMTLLib.core.device import device_choices

        return device_choices()

    @staticmethod
    def deviceTooltip():
        from NoduleMTLLib.core.device import device_tooltip

        return device_tooltip()

    @staticmethod
    def detectionStatus():
        """``(ok, reason)``: whether Find nodules (whole-scan detection) can run."""
        return _analysis().detector_status()

    @staticmethod
    def importModel(path):
        """Verify a ``.safetensors`` file against the manifest and copy it into the user
        cache folder; returns ``(network_id, destination)``.

        Raises:
            NoduleMTLLib.models.model_import.ModelImportError: the file matches no manifest entry
                (the message says why) or the cache folder cannot be written.
        """
        from NoduleMTLLib.models.model_import import import_weights_file

        return import_weights_file(path)

    @staticmethod
    def probabilityLegend():
        """Legend of the malignancy colour ramp (``NoduleMTLMRML.probability_legend``)."""
        import NoduleMTLMRML

        return NoduleMTLMRML.probability_legend()

    # --- dependencies ----------------------------------------------------------

    @staticmethod
    def missingPythonRequirements():
        """pip requirement strings of the non-torch packages that cannot be imported."""
        return [req for name, req in PYTHON_REQUIREMENTS if importlib.util.find_spec(name) is None]

    def setupPythonRequirements(self, askConfirmation=True):
        """Make sure torch, torchvision and the other packages can be imported.

        torch/torchvision are installed only through the PyTorch extension
        (``PyTorchUtilsLogic.installTorch``, which picks the CUDA or CPU build that fits
        the machine).  Other packages are installed with ``slicer.packaging.pip_ensure``
        (``slicer.pydeps`` in Slicer 5.11, ``slicer.util.pip_install`` before), with a
        constraints file that pins SimpleITK, numpy, torch and torchvision to the installed
        versions: Slicer's own packages are never replaced.

        Returns:
            True if everything is importable, False if the user declined an installation.

        Raises:
            RuntimeError: the PyTorch extension is missing or an installation failed.
        """
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(
                    "NoduleMTL needs the PyTorch extension. Install 'PyTorch' from the Extensions "
                    "Manager, restart Slicer and try again.") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled() or importlib.util.find_spec("torchvision") is None:
                logging.info("NoduleMTL: installing PyTorch (this may take several minutes)...")
                torch = torchLogic.installTorch(
                    askConfirmation=askConfirmation,
                    torchVersionRequirement=TORCH_VERSION_REQUIREMENT,
                    torchvisionVersionRequirement=TORCHVISION_VERSION_REQUIREMENT)
                if torch is None:
                    return False

        missing = self.missingPythonRequirements()
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    "NoduleMTL needs these Python packages, which will be installed now:\n\n"
                    + "\n".join(missing), "NoduleMTL: install Python packages"):
                return False
            self._pipInstall(missing)
            importlib.invalidate_caches()
            still = self.missingPythonRequirements()
            if still:
                raise RuntimeError(f"Could not install: {', '.join(still)}")
        return True

    @staticmethod
    def _pipInstall(requirements):
        """Install ``requirements`` while pinning the packages Slicer (or the PyTorch
        extension) owns to their installed versions, so pip can never replace them."""
        import importlib.metadata
        import tempfile

        pins = []
        for distribution in ("numpy", "SimpleITK", "torch", "torchvision", "requests"):
            try:
                pins.append(f"{distribution}=={importlib.metadata.version(distribution)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        with tempfile.TemporaryDirectory() as folder:
            constraints = os.path.join(folder, "constraints.txt")
            with open(constraints, "w") as f:
                f.write("\n".join(pins) + "\n")
            packaging = None
            for name in ("packaging", "pydeps"):  # slicer.packaging (newest) or slicer.pydeps (5.11)
                try:
                    packaging = importlib.import_module(f"slicer.{name}")
                    break
                except ImportError:
                    continue
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                # The user has already confirmed above.
                packaging.pip_ensure(list(requirements), constraints=constraints, prompt_install=False,
                                     requester="NoduleMTL")
            else:
                slicer.util.pip_install(list(requirements) + ["-c", constraints])

    # --- processing ----------------------------------------------------------

    @staticmethod
    def numberOfDefinedPoints(pointsNode):
        """Number of control points with a defined position."""
        if pointsNode is None:
            return 0
        defined = slicer.vtkMRMLMarkupsNode.PositionDefined
        return sum(1 for i in range(pointsNode.GetNumberOfControlPoints())
                   if pointsNode.GetNthControlPointPositionStatus(i) == defined)

    @staticmethod
    def _networkTuple(networks):
        if isinstance(networks, str):
            networks = _analysis().split_networks(networks)
        networks = tuple(networks)
        if not networks:
            raise ValueError("Select at least one network")
        return networks

    def process(self, inputVolume, pointsNode, networks=(DEFAULT_NETWORK,), device=DEFAULT_DEVICE,
                progressCallback=None, waitForCompletion=True):
        """Analyse the nodule at each point of ``pointsNode`` and add the result to the scene.

        Args:
            inputVolume: ``vtkMRMLScalarVolumeNode``, CT in Hounsfield units.
            pointsNode: markups point list; one defined point per nodule (world positions).
            networks: network ids to run (or a comma-separated string); the first one's mask
                is reported.
            device: "auto", "cpu", "cuda" or "mps"; CUDA out of memory -> retried on the CPU
                (``NoduleMTLLib.service.analysis.analyze``, recorded in ``result.run``).
            progressCallback: optional ``callable(fraction: float, message: str)`` (synchronous path).
            waitForCompletion: True (scripts, tests): run in this process and return the
                scene nodes.  False: start a background ``PythonSlicer`` process and return
                it at once (:meth:`startAnalysis`; finish with :meth:`finishAnalysis`).

        Returns:
            ``(segmentationNode, tableNode, result)``: the NEW segmentation and table nodes
            (see ``NoduleMTLMRML.add_result_to_scene``) and the
            :class:`NoduleMTLLib.core.results.AnalysisResult`; or, with
            ``waitForCompletion=False``, the started ``NoduleMTLLib.apps.runner.AnalysisProcess``.

        Raises:
            ValueError: missing input volume or point list, no placed point, no network.
            NoduleMTLLib.core.io.InputError: the volume is not a usable CT, a point lies outside
                the volume or body, or the network is unknown.
            RuntimeError (WeightsError, DeviceError): missing weights or unavailable device.
        """
        if not waitForCompletion:
            return self.startAnalysis(inputVolume, pointsNode, networks=networks, device=device)
        if inputVolume is None:
            raise ValueError("Select an input CT volume")
        if pointsNode is None:
            raise ValueError("Select a point list with one point on each nodule")
        networks = self._networkTuple(networks)

        import NoduleMTLMRML

        start = time.time()
        ct = NoduleMTLMRML.volume_node_to_ct(inputVolume)
        pointsLps = NoduleMTLMRML.markups_to_points_lps(pointsNode)
        if not pointsLps:
            raise ValueError(f"'{pointsNode.GetName()}' has no placed points: place one point on each nodule")
        logging.info(f"NoduleMTL: analysing {len(pointsLps)} point(s) in '{inputVolume.GetName()}' "
                     f"with {', '.join(networks)} on {device}")
        result = _analysis().analyze(ct, pointsLps, network_ids=networks, device=device, progress=progressCallback,
                                     patient=self.patientInfo(inputVolume),  # Lung-RADS, Brock columns
                                     notify=lambda message: logging.warning(f"NoduleMTL: {message}"))
        scene = inputVolume.GetScene() or slicer.mrmlScene
        segmentationNode, tableNode = NoduleMTLMRML.add_result_to_scene(scene, result, inputVolume)
        self.lastRunSeconds = time.time() - start
        logging.info(f"NoduleMTL: {self.statusText(result, self.lastRunSeconds)}")
        return segmentationNode, tableNode, result

    @staticmethod
    def pythonExecutable():
        """``PythonSlicer`` (Slicer's Python launcher) that runs the background process.

        Raises:
            RuntimeError: not found (neither on PATH nor in Slicer's bin folder).
        """
        exe = shutil.which("PythonSlicer")
        if exe:
            return exe
        suffix = ".exe" if os.name == "nt" else ""
        for folder in (os.path.join(slicer.app.slicerHome, "bin"), os.path.dirname(sys.executable)):
            candidate = os.path.join(folder, "PythonSlicer" + suffix)
            if os.path.isfile(candidate):
                return candidate
        raise RuntimeError("PythonSlicer (Slicer's Python) was not found: cannot run the analysis in the background")

    def backgroundWorker(self):
        """The session's persistent worker (``NoduleMTLLib.apps.worker.Worker``, one ``PythonSlicer``
        process that keeps its networks loaded between runs), created on first use and shared
        by every Logic instance; the process itself starts with the first run."""
        global _WORKER
        if _WORKER is None:
            _WORKER = _worker().Worker(python_executable=self.pythonExecutable())
        return _WORKER

    def warmUpBackgroundWorker(self):
        """Start the persistent worker process now (module entered), so that the first analysis
        does not wait for a new ``PythonSlicer`` process; the networks still load with the first
        run (the web reviewer, ``NoduleMTLReview``, also runs a throw-away analysis because it owns
        its worker's queue).  Never raises: a failure shows at the first run, with its reason."""
        try:
            self.backgroundWorker().ensure_started()
        except Exception as e:  # noqa: BLE001 - PythonSlicer missing, cannot start: reported by the first run
            logging.warning(f"NoduleMTL: background worker not started: {e}")

    @staticmethod
    def stopBackgroundWorker():
        """End the persistent worker (module cleanup: Slicer closes)."""
        global _WORKER
        if _WORKER is not None:
            _WORKER.close()
            _WORKER = None

    def startAnalysis(self, inputVolume, pointsNode=None, networks=(DEFAULT_NETWORK,), device=DEFAULT_DEVICE,
                      detect=False, detectionThreshold=0.0):
        """Start the analysis in the persistent background worker (:meth:`backgroundWorker`,
        started on first use; later runs reuse its loaded networks) and return it at once.

        The volume is converted with ``NoduleMTLMRML.volume_node_to_ct`` (world geometry,
        checks) and written to the run's private temporary folder; the points are passed as
        world LPS.  Nothing in the scene is changed (a cancelled run leaves it as it was).
        Poll the returned ``NoduleMTLLib.apps.runner.AnalysisProcess`` (``poll()`` /
        ``finished``; what it asked the worker: ``job.request``, a
        ``NoduleMTLLib.apps.protocol.AnalysisRequest``), then call :meth:`finishAnalysis`.

        Args:
            inputVolume: the CT volume node.
            pointsNode: point list (one point per nodule); None with ``detect``.
            networks, device: as :meth:`process`.
            detect: whole-scan detection (request field ``detect``) instead of points.
            detectionThreshold: with ``detect``, the minimum score in (0, 1); 0 (or None)
                = the default operating point (request field ``threshold``, see ``NoduleMTLLib.detection.infer``).

        Raises:
            ValueError / NoduleMTLLib.core.io.InputError: as :meth:`process`; a threshold outside [0, 1].
            RuntimeError: PythonSlicer not found.  OSError: the temporary folder cannot be written.
        """
        if inputVolume is None:
            raise ValueError("Select an input CT volume")
        networks = self._networkTuple(networks)
        import NoduleMTLMRML

        ct = NoduleMTLMRML.volume_node_to_ct(inputVolume)
        pointsLps = []
        if not detect:
            if pointsNode is None:
                raise ValueError("Select a point list with one point on each nodule")
            pointsLps = NoduleMTLMRML.markups_to_points_lps(pointsNode)
            if not pointsLps:
                raise ValueError(f"'{pointsNode.GetName()}' has no placed points: place one point on each nodule")
        # request fields of NoduleMTLLib.apps.protocol.AnalysisRequest beyond the inputs
        options = {"pictures": False}  # the run's folder is temporary; "Export report" draws them
        if detect and detectionThreshold:
            t = float(detectionThreshold)
            if not 0.0 < t <= 1.0:
                raise ValueError(f"The detection threshold must be in [0, 1] (0 = default), got {t}")
            options["threshold"] = t
        patient = self.patientInfo(inputVolume)  # the temporary NRRD has no DICOM header
        options["patient"] = {k: v for k, v in (("age", patient.age), ("sex", patient.sex)) if v is not None}
        job = _runner().AnalysisProcess(ct, pointsLps, detect=detect, networks=networks, device=device,
                                        python_executable=self.pythonExecutable(),
                                        temp_root=slicer.app.temporaryPath, options=options,
                                        worker=self.backgroundWorker())
        job.start()
        logging.info(f"NoduleMTL: started {job.request.to_json()}")
        return job

    def finishAnalysis(self, job, inputVolume):
        """Add the outputs of a finished background run to the scene (new nodes only) and
        delete its temporary folder.

        Returns:
            ``(segmentationNode, tableNode, result)`` as :meth:`process`.

        Raises:
            RuntimeError: the run failed or was cancelled (message from the run), or the
                volume was removed from the scene meanwhile.
            ValueError: the volume's grid changed meanwhile (mask shapes differ).
        """
        import NoduleMTLMRML

        try:
            if job.state != "succeeded":
                job.result()  # raises RuntimeError with the reason
            if inputVolume is None or inputVolume.GetScene() is None:
                raise RuntimeError("The input volume was removed from the scene while the analysis ran")
            result = job.result()
            segmentationNode, tableNode = NoduleMTLMRML.add_result_to_scene(inputVolume.GetScene(), result, inputVolume)
        finally:
            job.cleanup()
        self.lastRunSeconds = job.seconds
        logging.info(f"NoduleMTL: {self.statusText(result, self.lastRunSeconds)}")
        return segmentationNode, tableNode, result

    def findNodules(self, inputVolume, networks=(DEFAULT_NETWORK,), device=DEFAULT_DEVICE, progressCallback=None,
                    waitForCompletion=True, detectionThreshold=0.0):
        """Whole-scan detection (``nodulemtl analyze --detect``), always in a background
        process; with ``waitForCompletion`` it is waited for and added to the scene
        (returns ``(segmentationNode, tableNode, result)``), else the started process is returned.
        ``detectionThreshold``: score threshold in (0, 1], 0 = the default operating point (:meth:`startAnalysis`).

        Raises:
            RuntimeError: the detector is not available, or the run failed (its message).
        """
        ok, reason = self.detectionStatus()
        if not ok:
            raise RuntimeError(reason)
        job = self.startAnalysis(inputVolume, None, networks=networks, device=device, detect=True,
                                 detectionThreshold=detectionThreshold)
        if not waitForCompletion:
            return job

        def onEvent(event):
            if progressCallback is not None and event.kind == "progress":
                progressCallback(event.fraction, job.message)

        job.wait(callback=onEvent)
        return self.finishAnalysis(job, inputVolume)

    # --- results: navigation, refinement, export ------------------------------

    @staticmethod
    def tableRowFromViewRow(tableNode, viewRow):
        """Table row shown at ``viewRow`` of a ``qMRMLTableView`` (the first view row holds
        the column names unless they are used as the header), None for the header row."""
        useHeader = True
        for getter in ("GetUseColumnTitleAsColumnHeader", "GetUseColumnNameAsColumnHeader"):
            if hasattr(tableNode, getter):
                useHeader = bool(getattr(tableNode, getter)())
                break
        row = viewRow if useHeader else viewRow - 1
        return row if 0 <= row < tableNode.GetNumberOfRows() else None

    @staticmethod
    def noduleCenterRAS(tableNode, row):
        """World RAS position to centre the views on for a results table row: the centre of
        the row's segment (``segment_id`` column, segmentation referenced as
        ``NoduleMTL.segmentation``), else the clicked point (``point_ras_mm``); None if neither."""
        table = tableNode.GetTable()
        segmentationNode = tableNode.GetNodeReference("NoduleMTL.segmentation")
        column = table.GetColumnByName("segment_id")
        if segmentationNode is not None and column is not None:
            segmentId = column.GetValue(row)
            if segmentId and segmentationNode.GetSegmentation().GetSegment(segmentId) is not None:
                center = segmentationNode.GetSegmentCenterRAS(segmentId)
                if center is not None:
                    return tuple(float(v) for v in center)
        column = table.GetColumnByName("point_ras_mm")
        if column is not None:
            try:
                return _text().parse_ras_text(column.GetValue(row))
            except ValueError:
                return None
        return None

    @staticmethod
    def noduleSegmentIds(segmentationNode, tableNode=None, row=None):
        """Segment ID of a table row, or (row None) every segment of the segmentation."""
        if segmentationNode is None:
            raise ValueError("No result segmentation: run the analysis first")
        if tableNode is not None and row is not None:
            column = tableNode.GetTable().GetColumnByName("segment_id")
            segmentId = column.GetValue(row) if column is not None else ""
            if not segmentId:
                raise ValueError(f"Row {row + 1} of '{tableNode.GetName()}' has no segment (nothing was found there)")
            return [segmentId]
        segmentation = segmentationNode.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    def reclassifySegments(self, segmentationNode, segmentIds, referenceVolumeNode, tableNode=None, networks=None,
                           device=DEFAULT_DEVICE):
        """Re-measure and re-classify (possibly edited) segments without re-segmenting
        (``NoduleMTLMRML.reclassify_segment``); the segments' voxels are never changed.
        Returns the new ``NoduleResult`` s.

        Raises:
            ValueError / InputError: empty segment, missing nodes; WeightsError, DeviceError.
        """
        import NoduleMTLMRML

        return [NoduleMTLMRML.reclassify_segment(referenceVolumeNode.GetScene(), segmentationNode, segmentId,
                                                 referenceVolumeNode, tableNode,
                                                 network_ids=list(networks) if networks else None, device=device)
                for segmentId in segmentIds]

    def startReclassification(self, segmentationNode, segmentIds, referenceVolumeNode, tableNode=None, networks=None,
                              device=DEFAULT_DEVICE):
        """Re-classify (possibly edited) segments in the background worker (``nodulemtl
        reclassify``; what *Re-classify from edited mask* does): the masks are read from the
        scene now, the networks run in the worker, :meth:`finishReclassification` writes the
        results.  Returns the started ``NoduleMTLLib.apps.runner.AnalysisProcess``.

        Raises:
            ValueError / InputError: empty segment, missing nodes (nothing started).
        """
        import NoduleMTLMRML

        requests = [NoduleMTLMRML.reclassification_request(referenceVolumeNode.GetScene(), segmentationNode, segmentId,
                                                           referenceVolumeNode, tableNode,
                                                           list(networks) if networks else None)
                    for segmentId in segmentIds]
        points = [r["point_lps"] for r in requests]
        corrections = [r["size_correction"] for r in requests]  # the run's, kept while a mask is unedited
        ct = NoduleMTLMRML.volume_node_to_ct(referenceVolumeNode)
        job = _runner().AnalysisProcess(ct, points if all(p is not None for p in points) else None,
                                        networks=requests[0]["network_ids"], device=device,
                                        python_executable=self.pythonExecutable(), temp_root=slicer.app.temporaryPath,
                                        worker=self.backgroundWorker(), masks=[r["mask"] for r in requests],
                                        nodule_ids=[r["nodule_id"] for r in requests],
                                        options={"size_corrections": corrections} if any(corrections) else None)
        job.reclassification = (segmentationNode, list(segmentIds), [r["table"] for r in requests], requests[0]["network_ids"])
        job.start()
        logging.info(f"NoduleMTL: started {job.request.to_json()}")
        return job

    def finishReclassification(self, job):
        """Write the results of a finished :meth:`startReclassification` into the segments'
        tags, colours and table rows (``NoduleMTLMRML.apply_reclassification``); returns the
        ``NoduleResult`` s.  Raises RuntimeError when the run failed or was cancelled."""
        import NoduleMTLMRML

        try:
            result = job.result()  # raises RuntimeError with the reason
            segmentationNode, segmentIds, tables, ids = job.reclassification
            for segmentId, table, nodule in zip(segmentIds, tables, result.nodules):
                NoduleMTLMRML.apply_reclassification(segmentationNode, segmentId, table, nodule, ids)
        finally:
            job.cleanup()
        return result.nodules

    def exportSegmentsForTraining(self, segmentationNode, segmentIds, referenceVolumeNode, outDir):
        """Write each segment with its CT patch and labels for fine-tuning
        (``NoduleMTLMRML.export_segment_for_training``); returns what each call wrote."""
        import NoduleMTLMRML

        return [NoduleMTLMRML.export_segment_for_training(segmentationNode, segmentId, referenceVolumeNode, outDir)
                for segmentId in segmentIds]

    @staticmethod
    def dicomSeriesFolder(volumeNode):
        """Folder holding the DICOM files a volume was loaded from (Slicer's DICOM database;
        a temporary folder of links when they lie in several folders), or None."""
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split() if volumeNode else []
        db = getattr(slicer, "dicomDatabase", None)
        if not uids or db is None:
            return None
        files = [f for f in (db.fileForInstance(u) for u in uids) if f and os.path.isfile(f)]
        if len(files) != len(uids):
            return None
        dirs = {os.path.dirname(f) for f in files}
        if len(dirs) == 1:
            return dirs.pop()
        import tempfile
        folder = tempfile.mkdtemp(prefix="NoduleMTL-dicom-", dir=slicer.app.temporaryPath)
        for n, f in enumerate(files):
            os.symlink(f, os.path.join(folder, f"{n:05d}.dcm"))
        return folder

    def patientInfo(self, volumeNode):
        """Brock patient inputs (age, sex) from the DICOM header of a DICOM-loaded volume; empty otherwise."""
        from NoduleMTLLib.clinical.brock import PatientInfo, patient_from_dicom

        folder = self.dicomSeriesFolder(volumeNode)
        if folder is None:
            return PatientInfo()
        import NoduleMTLMRML
        return patient_from_dicom(folder, NoduleMTLMRML._dicom_series_uid(volumeNode))

    def exportReport(self, segmentationNode, referenceVolumeNode, outDir, tableNode=None):
        """``NoduleMTLMRML.export_report``: pictures + report.html, and DICOM SEG + SR when the
        volume was loaded from DICOM (its files found in the DICOM database).  Returns the paths."""
        import NoduleMTLMRML

        return NoduleMTLMRML.export_report(segmentationNode, referenceVolumeNode, outDir,
                                           dicom_folder=self.dicomSeriesFolder(referenceVolumeNode), tableNode=tableNode)

    # --- presentation helpers (GUI-free, used by the widget) -----------------

    @staticmethod
    def summaryHtml(result):
        """Per nodule: size, type, per-network probabilities and signs, consensus (HTML)."""
        return _text().summary_html(result, _DISCLAIMER)

    @staticmethod
    def statusText(result, seconds=None):
        """"Done: N of M nodule(s) segmented on <device> in <t> s", with the CPU-fallback note."""
        return _text().status_text(result, seconds)


#
# NoduleMTLTest
#

class NoduleMTLTest(ScriptedLoadableModuleTest):
    """Self test (runs in Slicer, also with ``--no-main-window``): the click path on the
    sample CT crop shipped in Resources/SampleData, synchronously and in the background,
    and a cancelled background run."""

    #: Sample CT (LIDC-IDRI-0003, cropped) and points on its two nodules (RAS mm).
    SAMPLE_CT = "SampleData/LIDC-IDRI-0003_crop.nrrd"
    NODULE_RAS = (-72.5, -77.2, -190.4)
    NODULE2_RAS = (-23.5, 47.6, -172.3)
    TIMEOUT_S = 600

    def setUp(self):
        """Reset the state: clear the scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_NoduleMTL1()
        self.setUp()
        self.test_NoduleMTL2_background()
        self.setUp()
        self.test_NoduleMTL3_cancel()

    def _loadSample(self, points):
        path = resourcePath(self.SAMPLE_CT)
        self.assertTrue(os.path.isfile(path), f"sample CT not found: {path}")
        volumeNode = slicer.util.loadVolume(path)
        pointsNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Nodule points")
        for ras in points:
            pointsNode.AddControlPoint(vtk.vtkVector3d(*ras))
        return volumeNode, pointsNode

    def test_NoduleMTL1(self):
        """Load the sample CT, place one point on the nodule, run the logic on the CPU and
        check that a segment with the nodule's results was created."""
        self.delayDisplay("Starting the test")
        logic = NoduleMTLLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        volumeNode, pointsNode = self._loadSample([self.NODULE_RAS])
        self.delayDisplay("Loaded sample data")

        progress = []
        segmentationNode, tableNode, result = logic.process(
            volumeNode, pointsNode, networks=(DEFAULT_NETWORK,), device="cpu",
            progressCallback=lambda f, m: progress.append(f))

        self.assertEqual(len(result.nodules), 1)
        self.assertTrue(result.nodules[0].found, result.nodules[0].message)
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 1)
        segment = segmentation.GetNthSegment(0)
        self.assertEqual(segment.GetName(), "Nodule 1")
        self.assertEqual(tableNode.GetNumberOfRows(), 1)
        self.assertGreater(result.nodules[0].volume_mm3, 0)
        self.assertTrue(progress, "the progress callback was never called")

        # the exported mask equals the result mask on the CT grid
        import NoduleMTLMRML
        mask = NoduleMTLMRML.label_array_from_segmentation(segmentationNode, segmentation.GetNthSegmentID(0), volumeNode)
        self.assertTrue((mask == result.nodules[0].mask).all())
        # the table row leads to the nodule
        ras = logic.noduleCenterRAS(tableNode, 0)
        self.assertIsNotNone(ras)
        self.assertLess(sum((a - b) ** 2 for a, b in zip(ras, self.NODULE_RAS)) ** 0.5, 15.0)
        self.delayDisplay("Test passed")

    def test_NoduleMTL2_background(self):
        """The same click path through the background PythonSlicer process: progress reaches
        1 and the masks equal those of the synchronous path."""
        self.delayDisplay("Starting the background test")
        logic = NoduleMTLLogic()
        volumeNode, pointsNode = self._loadSample([self.NODULE_RAS, self.NODULE2_RAS])
        job = logic.process(volumeNode, pointsNode, networks=(DEFAULT_NETWORK,), device="cpu", waitForCompletion=False)
        fractions = []
        deadline = time.time() + self.TIMEOUT_S
        while not job.finished and time.time() < deadline:
            fractions += [e.fraction for e in job.poll() if e.kind == "progress"]
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(job.state, "succeeded", job.details)
        self.assertEqual(fractions[-1], 1.0)
        numberOfSegmentations = len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode"))
        segmentationNode, tableNode, result = logic.finishAnalysis(job, volumeNode)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")), numberOfSegmentations + 1)
        self.assertFalse(os.path.exists(str(job.work_dir)), "the temporary folder was not removed")
        self.assertEqual(tableNode.GetNumberOfRows(), 2)

        _, _, direct = logic.process(volumeNode, pointsNode, networks=(DEFAULT_NETWORK,), device="cpu")
        for got, want in zip(result.nodules, direct.nodules):
            self.assertTrue((got.mask == want.mask).all(), f"nodule {got.id}: background and direct masks differ")
        self.delayDisplay("Background test passed")

    def test_NoduleMTL3_cancel(self):
        """Cancel right after the start: the child is gone, its folder deleted, the scene unchanged."""
        logic = NoduleMTLLogic()
        volumeNode, pointsNode = self._loadSample([self.NODULE_RAS])
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.startAnalysis(volumeNode, pointsNode, networks=(DEFAULT_NETWORK,), device="cpu")
        job.cancel()
        self.assertEqual(job.state, "cancelled")
        self.assertIsNotNone(job.returncode)
        self.assertFalse(os.path.exists(str(job.work_dir)))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        with self.assertRaises(RuntimeError):
            logic.finishAnalysis(job, volumeNode)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Cancel test passed")
