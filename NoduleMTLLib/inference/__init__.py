"""Click inference: the click pipeline (:mod:`.pipeline`), re-classification of given masks
(:mod:`.refine`), patch grids (:mod:`.roi`), intensity preprocessing and per-slice aggregation.
Imports :mod:`..core`, :mod:`..models` and :mod:`..clinical` (measured mask thresholds).
"""
