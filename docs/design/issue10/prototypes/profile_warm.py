"""cProfile of warm AutoLip estimates (certify=False, same weights, 20 calls) through the
reusable ``lipreg.AutoLip`` estimator: what a monitoring call costs besides the Lanczos
products (issue 10, item 7: trace/probe per call). Run:
    OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/profile_warm.py mlp
"""

import cProfile
import os
import pstats
import sys
import time

import torch

import lipreg

sys.path.insert(0, os.path.dirname(__file__))
from profile_certify import NETS

torch.set_num_threads(1)
name = sys.argv[1] if len(sys.argv) > 1 else "mlp"
make, shape = NETS[name]
torch.manual_seed(0)
model = make().eval()
est = lipreg.AutoLip(model, shape, certify=False)
est()
pr = cProfile.Profile(time.process_time)
pr.enable()
for _ in range(20):
    est()
pr.disable()
st = pstats.Stats(pr)
st.sort_stats("cumulative").print_stats(
    r"(autolip|analysis|probe|trace|ladder|power_iteration|chains)\.py", 14
)
