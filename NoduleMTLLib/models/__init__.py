"""Models: the network contract, the weights registry and manifest, model import, calibration
(``calibration.json``) and the network definitions (:mod:`.networks`).  Imports only :mod:`..core`.
"""
