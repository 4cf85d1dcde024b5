"""cProfile of one cold AutoLip estimate (certify=False) of the small CNN (issue 10, item 6).
Run: OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/profile_estimate.py"""

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
name = sys.argv[1] if len(sys.argv) > 1 else "smallcnn"
make, shape = NETS[name]
torch.manual_seed(0)
model = make().eval()
lipreg.autolip(model, shape, certify=False, state={})
pr = cProfile.Profile(time.process_time)
pr.enable()
for _ in range(3):
    lipreg.autolip(model, shape, certify=False, state={})
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
