"""NoduleMTL core library: pure Python (torch, numpy, SimpleITK, scikit-image).

Nothing in this package imports ``slicer``, ``vtk`` or ``qt``: it runs in plain
Python (command line, tests, training) and inside 3D Slicer alike.
"""

__version__ = "0.1.0"

#: Network ids used everywhere (CLI, JSON keys, registry, weights file names).
NETWORK_IDS = ("lnmsnet", "detguided", "maskrcnn25d", "dsmtnet", "mtnet")
