"""``nodulemtl review``: a web reviewer of NoduleMTL findings on Kitware's trame-slicer.

* :mod:`NoduleMTLReview.state` - the review's state (findings, statuses, navigation,
  undo / redo, what an export holds); pure Python, tested without a browser.
* :mod:`NoduleMTLReview.export` - writes the reviewed findings (SEG, SR, report.html,
  nodules.json / .csv) under the output-safety rules of :mod:`NoduleMTLLib.core.safe_output`.
* :mod:`NoduleMTLReview.app` - the trame application: Slicer's MRML scene and slice views
  (trame-slicer), the findings table, the click tool, review and refine tools.  Results become
  MRML nodes through the Slicer module's own layer (``NoduleMTLMRML``), and every analysis
  runs through the module's persistent worker (:mod:`NoduleMTLLib.apps.runner`).

The app lives beside the Slicer module (``NoduleMTL/``), not in ``NoduleMTLLib`` (which never
imports ``slicer``).  See ``docs/review.md``.
"""
