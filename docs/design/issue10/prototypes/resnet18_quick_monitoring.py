"""One resnet18 32x32 fit (SGD) with the default callback: which row ran at each step, its cost,
and the logged certified value and estimate. Usage: python resnet18_quick_monitoring.py EVERY STEPS."""

import sys, time

ROOT = __import__("pathlib").Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import torch
import training_overhead as to
from lipreg.callback import LipschitzCallback

every, steps = int(sys.argv[1]), int(sys.argv[2])
trace = []
real = LipschitzCallback._run


def run(self, method, network):
    t = time.perf_counter()
    out = real(self, method, network)
    trace.append(
        (
            self._step_now,
            method.name,
            time.perf_counter() - t,
            out.get("lipschitz/autolip_certified"),
            out.get("lipschitz/autolip"),
        )
    )
    return out


LipschitzCallback._run = run
fit = to.Fit("resnet18 3x32x32", to.resnet18, (3, 32, 32), 32, steps, False)
cb = to.default_callback(every)
seconds, trainer = to.fit_time(fit, "sgd", torch.device("cpu"), [cb])
print(f"fit {seconds:.1f}s; {to.reported(trainer)}")
for step, name, sec, cert, est in trace:
    print(
        f"  step {step:5d} {name:18s} {sec:6.3f}s cert {cert if cert is None else f'{cert:.4g}'} est {est if est is None else f'{est:.4g}'}"
    )
