"""Network definitions (pure torch). One module per paper; ids in :mod:`NoduleMTLLib.models.registry`.

Click networks: :mod:`.lnmsnet`, :mod:`.detguided`, :mod:`.dsmtnet`, :mod:`.mtnet`.  Whole-scan search:
:mod:`.maskrcnn25d` (the 2.5D Mask R-CNN detector, formerly ``detection/model.py``) and :mod:`.fpr25d`
(its false-positive reduction network, formerly ``detection/fp_reduction.py``); the search itself is
:mod:`NoduleMTLLib.detection`.
"""
