"""CNN-4 + SGD fits taking turns (benchmarks/lockstep_overhead.Baton): the garbage collector's
time during each fit's turns (gc.callbacks, by generation) and the minor page faults of each
fit's turns, inside and outside the callback's clock, next to the fit's time outside the
callback's clock. Usage: python lockstep_gc.py STEPS NET OPT."""
import sys
ROOT = __import__("pathlib").Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT))
import contextlib, gc, resource, threading, time, torch
from lipreg.callback_budget import CostBudget
import lockstep_overhead as lo
import training_overhead as to

steps, net, opt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
fit = to.mnist_fit(net, steps, False)
names = ["none", "n=10", "n=50"]
cbs = {"none": [], "n=10": [to.default_callback(10)], "n=50": [to.default_callback(50)]}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
class FaultBaton(lo.Baton):
    def __init__(self, n):
        super().__init__(n); self.faults = [0] * n; self.since_f = [0] * n
    def take(self, i):
        super().take(i); self.since_f[i] = faults()
    def hand_over(self, i, finished=False):
        self.faults[i] += faults() - self.since_f[i]; super().hand_over(i, finished)
baton = FaultBaton(len(names))
inside = {}
original = CostBudget.counting
@contextlib.contextmanager
def counting(self, *a, **k):
    f = faults()
    with original(self, *a, **k):
        yield
    inside[id(self)] = inside.get(id(self), 0) + faults() - f
CostBudget.counting = counting
gc_time = [[0.0, 0.0, 0.0] for _ in names]; gc_count = [[0, 0, 0] for _ in names]
started = {}
def on_gc(phase, info):
    if phase == "start":
        started["t"] = time.perf_counter()
    else:
        g = info["generation"]; gc_time[baton.turn][g] += time.perf_counter() - started["t"]; gc_count[baton.turn][g] += 1
gc.callbacks.append(on_gc)
trainers, modules = [], []
for i, name in enumerate(names):
    torch.manual_seed(0)
    modules.append(to.Classifier(fit.make, fit.shape, opt))
    for cb in cbs[name]:
        cb.budget.clock = baton.clock(i)
    trainers.append(to.quiet_trainer(steps, torch.device("cpu"), [lo.TakeTurns(baton, i), *cbs[name], lo.FinishTurns(baton, i)]))
ths = [threading.Thread(target=lambda i=i: trainers[i].fit(modules[i], to.loader(fit, steps))) for i in range(len(names))]
[t.start() for t in ths]; [t.join() for t in ths]
print(f"# {net} {opt} {steps} steps; tracked objects at the end: {len(gc.get_objects())}")
for i, n in enumerate(names):
    own = cbs[n][0].budget.own if cbs[n] else 0.0
    print(f"{n:6s} held {baton.held[i]:.3f} s ratio {baton.held[i]/baton.held[0]:.4f} own {own/baton.held[0]:.2%} outside {(baton.held[i]-own)/baton.held[0]:.4f}; "
          f"gc s by generation {[round(x, 4) for x in gc_time[i]]} counts {gc_count[i]}; "
          f"minor faults {baton.faults[i]} (inside the callback's clock {inside.get(id(cbs[n][0].budget), 0) if cbs[n] else 0})")
