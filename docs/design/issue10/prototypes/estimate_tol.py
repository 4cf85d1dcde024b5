"""The callback's Lanczos tolerance: warm estimates at tol 1e-4 / 1e-3 / 1e-2 from the same
warm vectors, every 50 steps of a fit (random MNIST-shaped batches of 128; SGD lr 0.01 or Adam
lr 1e-3, as benchmarks/training_overhead.py). Per call: time, Gram products per chain, and the
value relative to tol 1e-4's. Run (output: estimate_tol.out.md):
OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/estimate_tol.py adam cnn4
"""

import sys, time
sys.path.insert(0, "benchmarks")
import torch, torch.nn.functional as F
from training_overhead import mnist_cnn4, mlp
import lipreg
torch.manual_seed(0)
net = mlp() if sys.argv[2] == "mlp" else mnist_cnn4()
opt = torch.optim.Adam(net.parameters(), lr=1e-3) if sys.argv[1] == "adam" else torch.optim.SGD(net.parameters(), lr=0.01)
est = lipreg.AutoLip(net, (1, 28, 28), certify=False)
est()
g = torch.Generator().manual_seed(0)
for step in range(1, 301):
    x = torch.randn(128, 1, 28, 28, generator=g); y = torch.randint(0, 10, (128,), generator=g)
    opt.zero_grad(); F.cross_entropy(net(x), y).backward(); opt.step()
    if step % 50 == 0:
        row = []
        base = dict(est.state)
        ref = None
        for tol in (1e-4, 1e-3, 1e-2):
            t = time.perf_counter(); r = est(state=dict(base), tol=tol); t = time.perf_counter() - t
            its = [lb.n_iter for lb in r.layers if lb.kind == "affine"]
            if ref is None: ref = r.value; keep = r.state
            row.append(f"tol {tol:g}: {t*1e3:5.1f} ms its {its} rel {r.value/ref-1:+.1e}")
        est.state = keep
        print(step, " | ".join(row), flush=True)
