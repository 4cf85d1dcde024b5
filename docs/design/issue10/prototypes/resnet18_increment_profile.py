"""Profile of one incremental certificate of torchvision resnet18 (3x32x32, train-mode SGD lr
0.01, batch 32): anchored (quick ladder) after 300 steps, profiled 100 steps later; a warm
estimate (tol 1e-3) for scale. Run: OMP_NUM_THREADS=1 .venv/bin/python
docs/design/issue10/prototypes/resnet18_increment_profile.py (output: .out.md)
"""

import sys, time, warnings, cProfile, pstats
import torch, torchvision, torch.nn.functional as F
import lipreg
from lipreg.functional.autolip import autolip
from lipreg.functional.incremental import make_anchor, incremental_autolip
from lipreg.functional.ladder import quick_ladder
warnings.simplefilter("ignore")
torch.manual_seed(0)
net = torchvision.models.resnet18(num_classes=10)
opt = torch.optim.SGD(net.parameters(), lr=0.01)
shape = (3, 32, 32)
def steps(n):
    net.train()
    for _ in range(n):
        x = torch.randn(32, *shape); y = torch.randint(0, 10, (32,))
        opt.zero_grad(); F.cross_entropy(net(x), y).backward(); opt.step()
steps(300)
est = lipreg.AutoLip(net, shape, certify=False, tol=1e-3)
est()
opts = lambda: dict(state=est.state, analysis=est.analysis, tol=1e-3, max_iter=500, seed=0, dense_limit=2048)
cert = autolip(net, shape, certify=True, ladder=quick_ladder(), **opts())
anchor = make_anchor(net, shape, cert, analysis=est.analysis, step=0, ritz=0)
est.state = {k: v for k, v in cert.state.items() if "#" not in k}
steps(50)
t = time.perf_counter(); e = est(); print("warm estimate", time.perf_counter() - t)
steps(50)
pr = cProfile.Profile(); t = time.perf_counter(); pr.enable()
r = incremental_autolip(net, shape, anchor, **opts())
pr.disable(); print("increment", time.perf_counter() - t, r.value, r.estimate, cert.value)
pstats.Stats(pr).sort_stats("cumulative").print_stats(25)
