"""Criteria 1-2 of RULE.md from the drivers' outputs (issue 27, mixed-size fine-tune).

    python training/reports/maskrcnn25d/issue27/mixed_detector/compare.py FPM.json SI_SHIPPED.json SI_MIXED.json \
        MASSES_SHIPPED.json MASSES_MIXED.json OUT.json

FPM: fp_matched.py's output (each detector's FP-matched points); SI_*: training.small_insertion outputs
(seed 0, the same 120 placements); MASSES_*: recentre/masses_recentre.py outputs (seed 2), each run at
its detector's points ("default" / the high-sensitivity key).
"""
import json
import sys

VAL_HOSTS = {"LIDC-IDRI-0004", "LIDC-IDRI-0007"}


def found(rows, t):
    return [r["combined"] is not None and r["combined"] >= t for r in rows]


def share(rows, t, pick=lambda r: True):
    f = [x for r, x in zip(rows, found(rows, t)) if pick(r)]
    return {"found": int(sum(f)), "n": len(f), "share": round(sum(f) / len(f), 4) if f else None}


def si_summary(rows, t):
    return {"all": share(rows, t), "3-6 mm": share(rows, t, lambda r: r["diameter_mm"] < 6),
            "6-10 mm": share(rows, t, lambda r: r["diameter_mm"] >= 6),
            "validation hosts": share(rows, t, lambda r: r["scan"] in VAL_HOSTS)}


def main(fpm, si_a, si_b, m_a, m_b, out):
    pts = json.load(open(fpm))["detectors"]
    a, b = json.load(open(si_a))["nodules"], json.load(open(si_b))["nodules"]
    key = [(r["scan"], r["voi"], r["slab_z0"]) for r in a]
    if key != [(r["scan"], r["voi"], r["slab_z0"]) for r in b]:
        raise SystemExit("the two small_insertion runs placed different nodules")
    res = {"points": {n: {k: v["threshold"] for k, v in d.items()} for n, d in pts.items()}, "small_insertion": {}, "masses": {}}
    for k in ("default", "high_sensitivity"):
        ta, tb = pts["shipped"][k]["threshold"], pts["mixed"][k]["threshold"]
        fa, fb = found(a, ta), found(b, tb)
        res["small_insertion"][k] = {"shipped": si_summary(a, ta), "mixed": si_summary(b, tb),
                                     "paired": {"gained": sum(y and not x for x, y in zip(fa, fb)),
                                                "lost": sum(x and not y for x, y in zip(fa, fb))}}
    ma, mb = json.load(open(m_a))["summary"], json.load(open(m_b))["summary"]
    for name, s in (("shipped", ma), ("mixed", mb)):
        res["masses"][name] = {k.split("|")[0]: v for k, v in s.items() if k.endswith("recentre=None")}
    ia = res["small_insertion"]["default"]
    m_s, m_m = res["masses"]["shipped"]["default"], res["masses"]["mixed"]["default"]
    res["criteria"] = {
        "1_inserted_share_gain_>=_0.05": ia["mixed"]["all"]["share"] >= ia["shipped"]["all"]["share"] + 0.05,
        "1_validation_hosts_not_lower": ia["mixed"]["validation hosts"]["found"] >= ia["shipped"]["validation hosts"]["found"],
        "2_masses_one_nodule_>=_shipped-1": m_m["one"] >= m_s["one"] - 1,
        "2_masses_found_>=_shipped-1": m_m["found"] >= m_s["found"] - 1,
        "3_validation_nodules_not_fewer": all(
            len(pts["mixed"]["default"][f]) >= len(pts["shipped"]["default"][f]) for f in ("found_3_readers", "found_1_reader")),
    }
    json.dump(res, open(out, "w"), indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:7])
