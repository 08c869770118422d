import sys, time, tracemalloc, resource
sys.path.insert(0, "Testing/Benchmarks")
from pathlib import Path
from bench_detect import thin_scan
from NoduleMTLLib.core.io import read_ct
from NoduleMTLLib.detection import preprocess as pp, infer
p = thin_scan(Path("/work/cache"), Path("/tmp/thin0002.nrrd"))
ct = read_ct(p)
print("shape", ct.shape_zyx, "RSS after read %.2f GB" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6))
tracemalloc.start()
lung = pp.lung_mask_from_ct(ct); a = tracemalloc.get_traced_memory()[1]; tracemalloc.reset_peak()
ext, ml = pp.add_pleural_masses(ct.array, lung, k_to_feet=infer._k_to_feet(ct)); b = tracemalloc.get_traced_memory()[1]; tracemalloc.reset_peak()
c0 = infer.mass_shape_candidates(ct, ext, infer._k_to_feet(ct)); c = tracemalloc.get_traced_memory()[1]
print("tracemalloc peaks MiB: lung mask %.0f, pleural masses %.0f (added %.1f mL), shape candidates %.0f (%d)" % (a / 2**20, b / 2**20, ml, c / 2**20, len(c0)))
