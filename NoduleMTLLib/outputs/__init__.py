"""Outputs: the one writer (:mod:`.writer`), the core files (:mod:`.files`: labels, seg.nrrd, JSON,
CSV), DICOM SEG and SR, pictures, the HTML report, the field list (:mod:`.fields`) and colours.
Imports only :mod:`..core`; no torch.
"""
