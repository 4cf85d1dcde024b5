"""CNN-4 fits taking turns (benchmarks/lockstep_overhead.Baton): each fit step's time outside
the callback's clock, grouped by the number of steps since the callback last computed, next
to the same step of the fit without callback. Usage: python lockstep_after_work.py STEPS NET OPT."""
import sys
ROOT = __import__("pathlib").Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT))
import threading, time, torch, lightning.pytorch as pl
from statistics import median, mean
import lockstep_overhead as lo
import training_overhead as to

class RecBaton(lo.Baton):
    def __init__(self, n, budgets):
        super().__init__(n); self.intervals = [[] for _ in range(n)]; self.owns = [[] for _ in range(n)]
        self.budgets = budgets; self.last_own = [0.0] * n
    def hand_over(self, i, finished=False):
        self.intervals[i].append(time.perf_counter() - self.since[i])
        b = self.budgets[i]; own = b.own if b else 0.0
        self.owns[i].append(own - self.last_own[i]); self.last_own[i] = own
        super().hand_over(i, finished)

steps, net, opt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
fit = to.mnist_fit(net, steps, False)
names = ["none", "n=10", "n=1"]
cbs = {"none": [], "n=10": [to.default_callback(10)], "n=1": [to.default_callback(1)]}
budgets = [next((c.budget for c in cbs[n]), None) for n in names]
baton = RecBaton(len(names), budgets)
trainers, modules = [], []
for i, name in enumerate(names):
    torch.manual_seed(0)
    modules.append(to.Classifier(fit.make, fit.shape, opt))
    for cb in cbs[name]:
        cb.budget.clock = baton.clock(i)
    trainers.append(to.quiet_trainer(steps, torch.device("cpu"), [lo.TakeTurns(baton, i), *cbs[name], lo.FinishTurns(baton, i)]))
ths = [threading.Thread(target=lambda i=i: trainers[i].fit(modules[i], to.loader(fit, steps))) for i in range(len(names))]
[t.start() for t in ths]; [t.join() for t in ths]
base = baton.intervals[0]
print(f"# {net} {opt} {steps} steps; none: total {sum(base):.3f} s, median step {1000*median(base):.3f} ms")
for i, n in enumerate(names[1:], 1):
    iv, ow = baton.intervals[i], baton.owns[i]
    rest = [a - b for a, b in zip(iv, ow)]
    groups = {}
    since = 99
    for j, (r, o) in enumerate(zip(rest, ow)):
        if j < 20 or j >= len(base):
            continue
        key = "work" if o > 2e-4 else min(since, 6)
        # paired: same step of the fit without callback
        groups.setdefault(key, []).append((r, base[j]))
        since = 1 if o > 2e-4 else since + 1
    print(f"{n}: total {sum(iv):.3f} s ratio {sum(iv)/sum(base):.4f}; own {sum(ow):.3f} s ({sum(ow)/sum(base):.2%}); outside own {sum(rest)/sum(base):.4f}")
    for key in ["work", 1, 2, 3, 4, 5, 6]:
        g = groups.get(key, [])
        if not g:
            continue
        d = [r - b for r, b in g]
        print(f"   steps since work {key!s:>5}: n {len(g):5d}  median rest {1000*median(r for r, _ in g):.3f} ms  paired diff median {1000*median(d):+.3f} mean {1000*mean(d):+.3f} ms  summed {sum(d):+.3f} s")
