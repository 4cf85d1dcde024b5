"""Does the time a fit loses outside the callback's clock scale with the callback's work?
CNN-4 + SGD fits taking turns (benchmarks/lockstep_overhead.Baton): without callback (twice:
the lockstep's own spread) and with the callback at n = 10 under max_overhead 0.025, 0.05,
0.1. Usage: python lockstep_indirect_scaling.py STEPS ROUNDS NET OPT."""
import sys
ROOT = __import__("pathlib").Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT))
import threading, torch
from statistics import median
import lockstep_overhead as lo
import training_overhead as to
import lipreg

steps, rounds, net, opt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
fit = to.mnist_fit(net, steps, False)
def variants():
    return {"none": [], "e=0.025": [lipreg.LipschitzCallback(every_n_train_steps=10, max_overhead=0.025)],
            "e=0.05": [lipreg.LipschitzCallback(every_n_train_steps=10, max_overhead=0.05)],
            "none again": [],
            "e=0.1": [lipreg.LipschitzCallback(every_n_train_steps=10, max_overhead=0.1)]}
names = list(variants())
ratio = {n: [] for n in names}; outside = {n: [] for n in names}; own = {n: [] for n in names}
for r in range(rounds):
    cbs = variants()
    baton = lo.Baton(len(names))
    trainers, modules = [], []
    for i, name in enumerate(names):
        torch.manual_seed(0)
        modules.append(to.Classifier(fit.make, fit.shape, opt))
        for cb in cbs[name]:
            cb.budget.clock = baton.clock(i)
        trainers.append(to.quiet_trainer(steps, torch.device("cpu"), [lo.TakeTurns(baton, i), *cbs[name], lo.FinishTurns(baton, i)]))
    ths = [threading.Thread(target=lambda i=i: trainers[i].fit(modules[i], to.loader(fit, steps))) for i in range(len(names))]
    [t.start() for t in ths]; [t.join() for t in ths]
    for i, n in enumerate(names):
        o = cbs[n][0].budget.own if cbs[n] else 0.0
        ratio[n].append(baton.held[i] / baton.held[0]); own[n].append(o / baton.held[0])
        outside[n].append((baton.held[i] - o) / baton.held[0])
print(f"# {net} {opt}, {steps} steps, {rounds} rounds (medians; per round in brackets)")
for n in names:
    print(f"{n:10s} ratio {median(ratio[n]):.4f} own {median(own[n]):.2%} outside {median(outside[n]):.4f}  {[round(x, 4) for x in outside[n]]}")
