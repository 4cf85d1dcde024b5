"""Alternating fits without and with the default callback (wall time, process CPU time, the
callback's own clock, and wall minus own: the training time of the callback's fit). Run:
OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/overhead_pairs.py mlp adam 50 4 1500
(network mlp|cnn4, optimizer sgd|adam, every_n_train_steps, pairs, steps); output in
overhead_pairs.out.md.
"""

import sys, time
sys.path.insert(0, "benchmarks")
import torch
from training_overhead import Fit, fit_time, default_callback, mlp, mnist_cnn4
import lipreg
net = sys.argv[1]; opt = sys.argv[2]; n = int(sys.argv[3]); pairs = int(sys.argv[4]); steps = int(sys.argv[5])
fit = Fit(net, mlp if net == "mlp" else mnist_cnn4, (1, 28, 28) if net != "mlp" else (1, 28, 28), 128, steps, False)
for i in range(pairs):
    for variant in ("base", "cb"):
        cbs = [lipreg.LipschitzCallback(every_n_train_steps=n, max_overhead=0.05)] if variant == "cb" else []
        c0 = time.process_time()
        t, trainer = fit_time(fit, opt, torch.device("cpu"), cbs)
        c = time.process_time() - c0
        own = cbs[0].budget.own if cbs else 0.0
        print(f"{i} {variant:4s} wall {t:7.2f} cpu {c:7.2f} own {own:6.2f} wall-own {t-own:7.2f}", flush=True)
