"""NoduleMTL core library: pure Python (torch, numpy, SimpleITK, scikit-image).

Nothing in this package imports ``slicer``, ``vtk`` or ``qt``: it runs in plain
Python (command line, tests, training) and inside 3D Slicer alike.
"""

__version__ = "0.1.0"

#: Click networks of the default configuration (``nodulemtl analyze`` / ``batch`` without
#: ``--networks``, the Slicer module's default), chosen by measurement on the held-out HU VOIs
#: under the speed target (``training/calibration.py``, ``training/RESULTS.md``); must equal
#: ``default.networks`` of ``Resources/Weights/calibration.json`` (tested).  The documented
#: default: here (not in the registry) so that the Slicer module reads it before torch is
#: installed; ``NoduleMTLLib.models.registry.DEFAULT_NETWORKS`` is this tuple.
DEFAULT_NETWORKS = ("dsmtnet",)
