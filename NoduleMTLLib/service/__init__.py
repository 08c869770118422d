"""The service: :func:`.analysis.analyze` / :func:`.analysis.reclassify` own the whole answer
(inputs checked, networks loaded, engines run, calibration, the assessment of :mod:`.assessment`,
duplicate clicks merged by :mod:`.duplicates`).  Imports everything below it except :mod:`..outputs`
and :mod:`..apps`.
"""
