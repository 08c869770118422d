"""The review app's scene logic without a browser: a real trame-slicer ``SlicerApp`` scene with
``NoduleMTLReview.app.ReviewApp`` (not started), fed through the Slicer module's MRML layer.

Reopening an export (``--results``) brings the findings back as segments with the module's names
and their review statuses; re-exporting from the scene keeps them; the page cannot read outside
the allowed folders.  No network runs (the sample's readers' masks stand in for a run's masks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trame_slicer", reason="trame-slicer not installed (review dependency group)")
pytestmark = pytest.mark.slow  # ~25 s: trame-slicer's scene and three EGL slice views

from test_review_state import _sample_result  # noqa: E402

from NoduleMTLReview.state import ACCEPTED, REJECTED, UNDECIDED  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from trame.app import get_server

    from NoduleMTLReview.app import ReviewApp

    root = tmp_path_factory.mktemp("review_app")
    server = get_server("nodulemtl-review-test", client_type="vue3")
    a = ReviewApp(server, roots=[SAMPLE.parent, root], warm_up=False)
    a.root = root
    yield a
    a.close()


def test_reopen_results_and_export_again(app):
    from NoduleMTLReview.export import write_review_outputs

    ct, res = _sample_result(SAMPLE)
    first = app.root / "first"
    write_review_outputs(res, {1: ACCEPTED, 2: REJECTED}, ct, first, pictures=False)

    app.open_ct(SAMPLE)
    app.open_results(first)
    rows = app.state.findings
    assert [(r["id"], r["status"]) for r in rows] == [(1, ACCEPTED), (2, REJECTED)]
    assert rows[0]["long_mm"] == pytest.approx(res.nodules[0].diameter_mm, rel=1e-3)
    # the Slicer module's MRML layer made the segments: names, terminology, tags
    f = app.review.get(1)
    seg = app.slicer.scene.GetNodeByID(f.segmentation_node_id)
    segment = seg.GetSegmentation().GetSegment(f.segment_id)
    assert segment.GetName() == "Nodule 1"
    import NoduleMTLMRML

    assert NoduleMTLMRML._get_tag(segment, "NoduleMTL.id") == "1"
    terminology = segment.GetTerminology() if hasattr(segment, "GetTerminology") else ""
    assert "27925004" in terminology  # SCT "Nodule", as in the Slicer module

    # keyboard: next, back to undecided, undo
    app.on_key("n")
    assert app.review.current == 2
    app.on_key("u")
    assert app.review.get(2).status == UNDECIDED
    app.on_key("z")
    assert app.review.get(2).status == REJECTED

    second = app.root / "second"
    paths = app.export(str(second))
    assert {p.name for p in paths} >= {"nodules.json", "nodules.csv", "report.html"}
    data = json.loads((second / "nodules.json").read_text())
    assert [(d["id"], d["review_status"]) for d in data["nodules"]] == [(1, ACCEPTED), (2, REJECTED)]
    with pytest.raises(Exception, match="outside the folders"):
        app.export("/tmp/../etc/nodulemtl-review")
    app.state.open_path = "/etc/passwd"
    app.open_from_page()
    assert "outside the folders" in app.state.error
