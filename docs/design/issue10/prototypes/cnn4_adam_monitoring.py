"""Which monitoring steps of a CNN-4 fit (1500 steps, defaults, n = 50) the budget runs.

One fit with an instrumented callback: the rows computed at every monitoring step, the
callback's own seconds and training seconds, the measured costs. Run:
OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/cnn4_adam_monitoring.py adam
"""

import sys, time
sys.path.insert(0, "benchmarks")
import torch
from training_overhead import Fit, fit_time, default_callback, mnist_cnn4
import lipreg

class Spy(lipreg.LipschitzCallback):
    def __init__(self, **kw):
        super().__init__(**kw); self.log_steps = []
    def _compute_and_log(self, trainer, step, due, in_batch):
        self.log_steps.append((step, sorted(due)))
        return super()._compute_and_log(trainer, step, due, in_batch)

opt = sys.argv[1]
fit = Fit("cnn4", mnist_cnn4, (1, 28, 28), 128, 1500, False)
cb = Spy(every_n_train_steps=50, max_overhead=0.05)
t, trainer = fit_time(fit, opt, torch.device("cpu"), [cb])
print("fit", t, "own", cb.budget.own, "train", cb.budget.training_seconds())
for s, d in cb.log_steps: print(s, d)
print({k: [round(x, 4) for x in v] for k, v in cb.budget.costs.items()}, cb.budget.unit)
