"""Core: the result model, CT input/output, masks and their measurements, errors, file names, the
output-folder rules, JSON, devices and progress.  Imports nothing else of NoduleMTLLib and needs no
torch at import (``device`` and ``results`` import it inside functions).

Modules: :mod:`.errors` (the one error root), :mod:`.filenames`, :mod:`.io` (CT volumes, DICOM,
coordinates), :mod:`.results` (the result model), :mod:`.consensus` (``MaskBox``, the networks'
consensus record), :mod:`.postprocess` (mask components and measurements), :mod:`.mask_input`,
:mod:`.safe_output`, :mod:`.strict_json`, :mod:`.device`, :mod:`.progress`, :mod:`.metrics`.
"""
