"""CNN-4 + SGD fits taking turns (benchmarks/lockstep_overhead.Baton): per-window median step
times and the fit time outside the callback's own clock. Usage: python lockstep_per_step.py STEPS ROUNDS."""
import sys
ROOT = __import__("pathlib").Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT))
import threading, torch, lightning.pytorch as pl
from statistics import median
import lockstep_overhead as lo
import training_overhead as to
import lipreg
from lipreg.models import mnist_cnn4

class Noop(pl.Callback):
    pass

class Logs(pl.Callback):
    """logs 30 scalars every 10 steps like the callback"""
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % 10 == 0:
            for k in range(30):
                pl_module.log(f"x/{k}", float(k))

class RecBaton(lo.Baton):
    def __init__(self, n):
        super().__init__(n); self.intervals = [[] for _ in range(n)]
    def hand_over(self, i, finished=False):
        import time
        self.intervals[i].append(time.perf_counter() - self.since[i])
        super().hand_over(i, finished)

def variants():
    return {
        "none": [],
        "default n=1": [to.default_callback(1)],
        "none after n=1": [],
        "n=1 tiny budget": [lipreg.LipschitzCallback(every_n_train_steps=1, max_overhead=1e-6, compute_at_fit_end=False)],
        "default n=10": [to.default_callback(10)],
    }

steps = int(sys.argv[1]); rounds = int(sys.argv[2])
fit = to.Fit("MNIST CNN-4", mnist_cnn4, (1, 28, 28), 128, steps, False)
names = list(variants())
held = {n: [] for n in names}; owns = {n: [] for n in names}
for r in range(rounds):
    vs = variants()
    baton = RecBaton(len(names))
    trainers, modules = [], []
    for i, name in enumerate(names):
        torch.manual_seed(0)
        modules.append(to.Classifier(fit.make, fit.shape, "sgd"))
        cbs = vs[name]
        for cb in cbs:
            if hasattr(cb, "budget"): cb.budget.clock = baton.clock(i)
        trainers.append(pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[lo.TakeTurns(baton, i), *cbs, lo.FinishTurns(baton, i)]))
    ths = [threading.Thread(target=lambda i=i: trainers[i].fit(modules[i], to.loader(fit, steps))) for i in range(len(names))]
    [t.start() for t in ths]; [t.join() for t in ths]
    for i, n in enumerate(names):
        held[n].append(baton.held[i])
        b = next((cb.budget for cb in trainers[i].callbacks if hasattr(cb, "budget")), None)
        owns[n].append(b.own if b else 0.0)
        iv = baton.intervals[i]; w = len(iv) // 5
        print(n, "per-window medians (ms):", [round(1000 * median(iv[k*w:(k+1)*w]), 2) for k in range(5)], "sum of windows (s):", [round(sum(iv[k*w:(k+1)*w]), 2) for k in range(5)])
for n in names:
    ratio = median(h / b for h, b in zip(held[n], held["none"]))
    rest = median((h - o) / b for h, o, b in zip(held[n], owns[n], held["none"]))
    print(f"{n:24s} held {median(held[n]):7.3f}  ratio {ratio:.3f}  (held-own)/none {rest:.3f}")
