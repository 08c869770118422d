"""Whole-scan nodule search network ``maskrcnn25d`` (building blocks).

Source: Li R. & Honarvar Shakibaei Asli B., "Multi-Task Deep Learning for Lung Nodule
Detection and Segmentation in CT Scans", Electronics 2026, 15(4), 736,
doi:10.3390/electronics15040736 (seed 002).  A 2.5D Mask R-CNN: five adjacent axial
slices as the five channels of one image, slice-wise detections merged into 3D nodules.

Modules (imported on demand; ``preprocess`` and ``merge`` need no torch):

* :mod:`.preprocess` - HU window, slice-wise CLAHE, lung mask (:class:`NoLungError`),
  5-slice stacks, input checks, lung bounds (paper section 3.2).
* :mod:`NoduleMTLLib.models.networks.maskrcnn25d` - the network,
  :func:`~NoduleMTLLib.models.networks.maskrcnn25d.build_maskrcnn25d` (torchvision Mask R-CNN
  with a 5-channel conv1, small-nodule anchors, auxiliary RoI classifier; section 3.3), and
  :mod:`NoduleMTLLib.models.networks.fpr25d` (false-positive reduction): with the other
  networks, in the models layer.
* :mod:`.merge` - slice detections -> 3D nodules, adaptive score threshold
  (sections 3.4.3, 3.5).
* :mod:`.infer` - the whole-scan search.

Training-only code lives in ``training/``: the three training phases and the LNMSNet
backbone transfer (``training.detection_phases``), the paper's nodule-level matching and
the LUNA16 FROC/CPM (``training.detection_matching``).
"""
