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
import sys
import time
from typing import Annotated

import qt
import vtk

import slicer
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
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

#: Default network and device.
DEFAULT_NETWORK = "lnmsnet"
DEVICE_CHOICES = ["auto", "cpu", "cuda"]

#: Python packages needed besides torch/torchvision: (import name, pip requirement).
#: SimpleITK and numpy are Slicer's own and are never (re)installed by this module;
#: torch and torchvision are installed only through the PyTorch extension.
PYTHON_REQUIREMENTS = (
    ("skimage", "scikit-image>=0.22"),
    ("scipy", "scipy"),
    ("safetensors", "safetensors>=0.4"),
    ("slicerio", "slicerio>=1.1"),
)
TORCH_VERSION_REQUIREMENT = ">=2.0"
TORCHVISION_VERSION_REQUIREMENT = ">=0.15"

_DISCLAIMER = "Research use only: not for clinical diagnosis."


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
<li><b>Settings</b>: choose the network and the device (auto uses the GPU when there is one).</li>
<li><b>Apply</b>: a new segmentation (one segment per nodule, standard terminology, results
as segment tags) and a results table are created under the CT's study. Existing
segmentations are never modified.</li>
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
    network - id of the network to run (``NoduleMTLLib.registry.available_networks()``);
        plain ``str`` because the list is only known at run time (the combo box is filled
        by the widget, not through the wrapper).
    device - "auto" (CUDA if available, else CPU), "cpu" or "cuda".
    outputSegmentation - segmentation created by the last run.
    outputTable - results table created by the last run.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    points: vtkMRMLMarkupsFiducialNode
    network: str = DEFAULT_NETWORK
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode


#
# NoduleMTLWidget
#

class NoduleMTLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: inputs, settings, Apply, results."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedPointsNode = None
        self._running = False

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

        # Network list comes from the registry at run time.
        self.ui.networkComboBox.clear()
        for networkId, title in self.logic.availableNetworks():
            self.ui.networkComboBox.addItem(title, networkId)

        # Point placement: several points in a row, one per nodule.
        self.ui.pointsPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.pointsPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.progressBar.hide()
        self.ui.malignancyLabel.text = ""
        self.ui.statusLabel.text = ""

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.networkComboBox.connect("currentIndexChanged(int)", self.onNetworkChanged)
        self.ui.pointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onPointsNodeChanged)
        self.ui.outputTableSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputTableChanged)

        self.initializeParameterNode()

    def cleanup(self):
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self):
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self):
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._observePointsNode(None)
        self.ui.pointsPlaceWidget.placeModeEnabled = False

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

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
        # network combo (not bound through the wrapper)
        networkId = p.network if p else DEFAULT_NETWORK
        index = self.ui.networkComboBox.findData(networkId)
        if index >= 0 and index != self.ui.networkComboBox.currentIndex:
            wasBlocked = self.ui.networkComboBox.blockSignals(True)
            self.ui.networkComboBox.currentIndex = index
            self.ui.networkComboBox.blockSignals(wasBlocked)
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

    def _checkCanApply(self, caller=None, event=None):
        p = self._parameterNode
        numberOfPoints = NoduleMTLLogic.numberOfDefinedPoints(p.points) if p and p.points else 0
        if self._running:
            self.ui.applyButton.enabled = False
        elif p and p.inputVolume and numberOfPoints > 0:
            self.ui.applyButton.toolTip = f"Analyse {numberOfPoints} nodule(s) in '{p.inputVolume.GetName()}'"
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = "Select a CT volume and place one point on each nodule"
            self.ui.applyButton.enabled = False

    def onNetworkChanged(self, index):
        if self._parameterNode and index >= 0:
            self._parameterNode.network = self.ui.networkComboBox.itemData(index)

    def onPointsNodeChanged(self, node):
        self.ui.pointsPlaceWidget.setCurrentNode(node)
        self._observePointsNode(node)
        self._checkCanApply()

    def onOutputTableChanged(self, node):
        self.ui.resultsTableView.setMRMLTableNode(node)

    def _onProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, float(fraction)))))
        self.ui.statusLabel.text = str(message)
        slicer.app.processEvents()

    def _setRunning(self, running):
        self._running = running
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = running
        if running:
            self.ui.pointsPlaceWidget.placeModeEnabled = False
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.settingsCollapsibleButton.enabled = not running
        self._checkCanApply()
        slicer.app.processEvents()

    def onApplyButton(self):
        """Install what is missing (with confirmation), run the analysis, show the results."""
        if self._running or not self._parameterNode:
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Nodule analysis failed.", waitCursor=True):
            self.ui.statusLabel.text = "Checking Python packages..."
            if not self.logic.setupPythonRequirements(askConfirmation=True):
                self.ui.statusLabel.text = "Required Python packages are not installed."
                return
            self._setRunning(True)
            try:
                segmentationNode, tableNode, result = self.logic.process(
                    p.inputVolume, p.points, networks=(p.network,), device=p.device,
                    progressCallback=self._onProgress)
            finally:
                self._setRunning(False)
            p.outputSegmentation = segmentationNode
            p.outputTable = tableNode
            segmentationNode.CreateClosedSurfaceRepresentation()  # show the nodules in 3D views too
            self.ui.malignancyLabel.text = NoduleMTLLogic.summaryHtml(result)
            self.ui.statusLabel.text = NoduleMTLLogic.statusText(result, self.logic.lastRunSeconds)
            self.ui.resultsCollapsibleButton.collapsed = False


#
# NoduleMTLLogic
#

class NoduleMTLLogic(ScriptedLoadableModuleLogic):
    """Computation, usable from scripts without the GUI (raises exceptions on errors).

    Example (Slicer Python console)::

        import NoduleMTL
        logic = NoduleMTL.NoduleMTLLogic()
        logic.setupPythonRequirements(askConfirmation=False)
        seg, table, result = logic.process(getNode("CT"), getNode("Nodule points"), device="cpu")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        #: Wall-clock seconds of the last :meth:`process` call (analysis + scene update).
        self.lastRunSeconds = None

    def getParameterNode(self):
        return NoduleMTLParameterNode(super().getParameterNode())

    # --- networks and dependencies -----------------------------------------

    @staticmethod
    def availableNetworks():
        """``[(network id, title), ...]`` that can run; falls back to the default network
        when the registry cannot be imported yet (e.g. PyTorch not installed)."""
        try:
            from NoduleMTLLib import registry

            return [(nid, f"{registry.NETWORKS[nid].title} ({nid})" if nid in registry.NETWORKS else nid)
                    for nid in registry.available_networks()]
        except Exception as e:  # ImportError without torch, or an incomplete installation
            logging.info(f"NoduleMTL: network registry not importable yet ({e}); offering '{DEFAULT_NETWORK}'")
            return [(DEFAULT_NETWORK, DEFAULT_NETWORK)]

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

    def process(self, inputVolume, pointsNode, networks=(DEFAULT_NETWORK,), device="auto", progressCallback=None):
        """Analyse the nodule at each point of ``pointsNode`` and add the result to the scene.

        Args:
            inputVolume: ``vtkMRMLScalarVolumeNode``, CT in Hounsfield units.
            pointsNode: markups point list; one defined point per nodule (world positions).
            networks: network ids to run; the first one's mask is reported (a single id is accepted).
            device: "auto", "cpu" or "cuda".
            progressCallback: optional ``callable(fraction: float, message: str)``.

        Returns:
            ``(segmentationNode, tableNode, result)``: the NEW segmentation and table nodes
            (see ``NoduleMTLMRML.add_result_to_scene``) and the
            :class:`NoduleMTLLib.results.AnalysisResult`.

        Raises:
            ValueError: missing input volume or point list, or no placed point.
            NoduleMTLLib.io.InputError: the volume is not a usable CT, a point lies outside
                the volume or body, or the network is unknown.
            RuntimeError (WeightsError, DeviceError): missing weights or unavailable device.
        """
        if inputVolume is None:
            raise ValueError("Select an input CT volume")
        if pointsNode is None:
            raise ValueError("Select a point list with one point on each nodule")
        if isinstance(networks, str):
            networks = (networks,)
        networks = tuple(networks)
        if not networks:
            raise ValueError("Select at least one network")

        import NoduleMTLMRML
        from NoduleMTLLib import pipeline

        start = time.time()
        ct = NoduleMTLMRML.volume_node_to_ct(inputVolume)
        pointsLps = NoduleMTLMRML.markups_to_points_lps(pointsNode)
        if not pointsLps:
            raise ValueError(f"'{pointsNode.GetName()}' has no placed points: place one point on each nodule")
        logging.info(f"NoduleMTL: analysing {len(pointsLps)} point(s) in '{inputVolume.GetName()}' "
                     f"with {', '.join(networks)} on {device}")
        result = pipeline.analyze_points(ct, pointsLps, network_ids=networks, device=device, progress=progressCallback)
        scene = inputVolume.GetScene() or slicer.mrmlScene
        segmentationNode, tableNode = NoduleMTLMRML.add_result_to_scene(scene, result, inputVolume)
        self.lastRunSeconds = time.time() - start
        logging.info(f"NoduleMTL: {self.statusText(result, self.lastRunSeconds)}")
        return segmentationNode, tableNode, result

    # --- presentation helpers (GUI-free, used by the widget) -----------------

    @staticmethod
    def summaryHtml(result):
        """One line per nodule: malignancy probability per network, size and type (HTML)."""
        lines = []
        for n in result.nodules:
            if not n.found:
                lines.append(f"<b>{n.name}</b>: no nodule found at the point. {n.message}".strip())
                continue
            probs = []
            for networkId, out in n.networks.items():
                p = out.malignancy_probability
                probs.append(f"{networkId} {'n/a' if p is None else f'{100.0 * p:.0f}%'}")
            size = f"{n.diameter_mm:.1f} mm" if n.diameter_mm is not None else "size n/a"
            kind = f", {n.type}" if n.type else ""
            lines.append(f"<b>{n.name}</b>: P(malignant) {', '.join(probs) or 'n/a'} &mdash; {size}{kind}")
        lines.append(f"<i>{_DISCLAIMER}</i>")
        return "<br>".join(lines)

    @staticmethod
    def statusText(result, seconds=None):
        """"Done: N nodule(s) ... on <device> in <t> s"."""
        run = result.run or {}
        found = sum(1 for n in result.nodules if n.found)
        timing = run.get("timing_s") or run.get("timings_s") or {}
        total = seconds if seconds is not None else timing.get("total")
        text = f"Done: {found} of {len(result.nodules)} nodule(s) segmented"
        if run.get("device"):
            text += f" on {run['device']}"
        if total is not None:
            text += f" in {float(total):.1f} s"
        return text


#
# NoduleMTLTest
#

class NoduleMTLTest(ScriptedLoadableModuleTest):
    """Self test: runs the logic on the sample CT crop shipped in Resources/SampleData."""

    #: Sample CT (LIDC-IDRI-0003, cropped) and a point on its nodule (RAS mm).
    SAMPLE_CT = "SampleData/LIDC-IDRI-0003_crop.nrrd"
    NODULE_RAS = (-72.5, -77.2, -190.4)

    def setUp(self):
        """Reset the state: clear the scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_NoduleMTL1()

    def test_NoduleMTL1(self):
        """Load the sample CT, place one point on the nodule, run the logic on the CPU and
        check that a segment with the nodule's results was created."""
        self.delayDisplay("Starting the test")
        logic = NoduleMTLLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))

        path = resourcePath(self.SAMPLE_CT)
        self.assertTrue(os.path.isfile(path), f"sample CT not found: {path}")
        volumeNode = slicer.util.loadVolume(path)
        pointsNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Nodule points")
        pointsNode.AddControlPoint(vtk.vtkVector3d(*self.NODULE_RAS))
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
        self.assertTrue(segment.HasTag(f"NoduleMTL.malignancy_probability.{DEFAULT_NETWORK}")
                        or result.nodules[0].networks[DEFAULT_NETWORK].malignancy_probability is None)
        self.assertEqual(tableNode.GetNumberOfRows(), 1)
        self.assertGreater(result.nodules[0].volume_mm3, 0)
        self.assertTrue(progress, "the progress callback was never called")

        # the exported mask equals the result mask on the CT grid
        import NoduleMTLMRML
        mask = NoduleMTLMRML.label_array_from_segmentation(segmentationNode, segmentation.GetNthSegmentID(0), volumeNode)
        self.assertTrue((mask == result.nodules[0].mask).all())
        self.delayDisplay("Test passed")
