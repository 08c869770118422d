"""Clinical rules: Lung-RADS v2022 (:mod:`.lung_rads`), Brock / PanCan risk (:mod:`.brock`) and the
thick-slice notes (:mod:`.thick_slices`).  Imports only :mod:`..core` and :mod:`..models` (calibration,
manifest paths), never torch at import.
"""
