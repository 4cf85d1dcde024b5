"""The small-CNN outlier (issue 10): certified AutoLip cost with the ladder's knobs changed.

Variants (monkeypatched, research only): today; the merged torus bound accepted within 1 %
of the estimate (``ladder.TORUS_ACCEPT = 1e-2``, i.e. no Gram test here); the Gram test
without the float64 refinement Lanczos (``refine=False``). CPU seconds, median of 3, as a
multiple of one forward+backward on one sample. Run:
    OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/smallcnn_variants.py
"""

import functools
import os
import statistics
import sys
import time

import torch

import lipreg
from lipreg.functional import banded_gram, ladder

sys.path.insert(0, os.path.dirname(__file__))
from profile_certify import fb_time, small_cnn


def cpu(fn, reps=3):
    ts, out = [], None
    for _ in range(reps):
        t = time.process_time()
        out = fn()
        ts.append(time.process_time() - t)
    return statistics.median(ts), out


torch.set_num_threads(1)
torch.manual_seed(0)
model, shape = small_cnn().eval(), (3, 32, 32)
fb = fb_time(model, shape)
print("load", os.getloadavg(), f"fwd+bwd {fb * 1e3:.2f} ms")
orig_accept, orig_cert = ladder.TORUS_ACCEPT, banded_gram.certify_conv_norm
variants = {
    "today": lambda: None,
    "torus accepted within 1%": lambda: setattr(ladder, "TORUS_ACCEPT", 1e-2),
    "Gram test, no float64 refine": lambda: setattr(
        ladder, "certify_conv_norm", functools.partial(orig_cert, refine=False)
    ),
}
for name, patch in variants.items():
    patch()
    t, r = cpu(lambda: lipreg.autolip(model, shape, certify=True))
    methods = [lb.method for lb in r.layers if lb.kind == "affine"]
    print(f"{name:32s} {t:.3f}s = {t / fb:7.1f}x  value {r.value:.6f}  {methods}")
    ladder.TORUS_ACCEPT, ladder.certify_conv_norm = orig_accept, orig_cert
t, r = cpu(lambda: lipreg.autolip(model, shape, certify=False, state={}))
print(f"{'estimate cold':32s} {t:.3f}s = {t / fb:7.1f}x  value {r.value:.6f}")
print("load", os.getloadavg())
