"""Entry points on top of the service and the writer: the command line (:mod:`.cli`), batch runs
(:mod:`.batch`, :mod:`.cluster`), PACS (:mod:`.pacs`), the persistent worker and its JSON protocol
(:mod:`.worker`, :mod:`.protocol`), the background runner of the Slicer module (:mod:`.runner`) and
the report options (:mod:`.reporting`).
"""
