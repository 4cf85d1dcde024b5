"""The analysis cache (issue 10 item 7): a reused trace and probe must give exactly what a
fresh analysis gives, after anything that can happen to a model between two calls; and the
one-sync finiteness check must name exactly the non-finite tensors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import lipreg
from lipreg.functional.analysis_cache import AnalysisCache
from lipreg.functional.probe import ProbeInterpreter
from lipreg.functional.rules import restored_registries
from lipreg.functional.trace import check_finite_parameters, nonfinite_names

F64 = torch.float64


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
        nn.Tanh(),
        nn.Linear(4, 2),
    )


SHAPE = (2, 5, 5)


def same(a: lipreg.LipschitzResult, b: lipreg.LipschitzResult) -> None:
    """Exactly equal results (values, estimates, every factor and method)."""
    assert (a.value, a.estimate, a.kind) == (b.value, b.estimate, b.kind)
    assert [(lb.name, lb.value, lb.method) for lb in a.layers] == [
        (lb.name, lb.value, lb.method) for lb in b.layers
    ]


def check_against_fresh(model: nn.Module, est: lipreg.AutoLip, certify: bool) -> None:
    cached = est(state={}, certify=certify)
    fresh = lipreg.autolip(model, SHAPE, state={}, certify=certify)
    same(cached, fresh)


@pytest.fixture(params=[False, True], ids=["estimate", "certified"])
def certify(request) -> bool:
    return request.param


def sgd_steps(model: nn.Module, n: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for k in range(n):
        opt.zero_grad()
        model(
            torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(k))
        ).square().sum().backward()
        opt.step()


def test_weight_updates_and_running_stats_reuse_the_structure(certify):
    model = net()
    est = lipreg.AutoLip(model, SHAPE, certify=certify)
    first = est(state={})
    sgd_steps(model)  # in-place weights, and BatchNorm running statistics (train mode)
    with torch.no_grad():
        model[1].running_var.mul_(4.0)
    check_against_fresh(model, est, certify)
    assert est.analysis.builds == 1 and est.analysis.last_reason is None
    assert est(state={}).value != first.value  # the new weights were read


@pytest.mark.parametrize(
    "change",
    [
        "new-parameter",
        "swap-module",
        "requires-grad",
        "double",
        "train-flag",
        "hook",
        "plain-attribute",
        "tensor-data",
    ],
)
def test_structural_changes_rebuild_and_match_fresh(change, certify):
    model = net(1)
    est = lipreg.AutoLip(model, SHAPE, certify=certify)
    est()
    if change == "new-parameter":
        model[4].weight = nn.Parameter(3 * model[4].weight.detach().clone())
    elif change == "swap-module":
        model[6] = nn.Linear(4, 2)
    elif change == "requires-grad":
        model[0].weight.requires_grad_(False)
    elif change == "double":
        model.double()
    elif change == "train-flag":
        model.eval()
    elif change == "hook":
        model[2].register_forward_hook(lambda *a: None)
    elif change == "plain-attribute":
        model[2].inplace = True
    else:  # .data assignment: same Parameter object, new storage and shape-compatible values
        model[6].weight.data = torch.randn(2, 4)
    with pytest.warns() if change == "hook" else _no_warning():
        check_against_fresh(model, est, certify)
    assert est.analysis.builds == 2 and est.analysis.reasons[-1].startswith("changed")


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Gated(nn.Module):
    """Python control flow on a module flag: the trace depends on it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, bias=False)
        self.skip = False

    def forward(self, x):
        return x + self.lin(x) if self.skip else self.lin(x)


def test_python_flag_that_changes_the_graph_is_seen():
    model = Gated().double()
    est = lipreg.AutoLip(model, (3,), dtype=F64)
    w = torch.linalg.matrix_norm(model.lin.weight.detach(), 2).item()
    first = est().value
    assert w <= first <= w * (1 + 1e-7)  # certified: above the truth, by a rounding pad
    model.skip = True  # now 1 + ||W|| (AutoLip's residual rule)
    second = est().value
    assert 1 + w <= second <= (1 + w) * (1 + 1e-7)
    assert est.analysis.builds == 2


class Derived(nn.Module):
    """forward() computes a constant from a parameter: its probe value must not be reused."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(
            torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, x):
        return x @ (2.0 * self.w).T


def test_constants_computed_from_state_are_never_cached():
    model = Derived()
    est = lipreg.AutoLip(model, (3,), dtype=F64)
    est()
    with torch.no_grad():
        model.w.mul_(3.0)
    truth = 2.0 * torch.linalg.matrix_norm(model.w.detach(), 2).item()
    assert truth <= est().value <= truth * (1 + 1e-7)
    assert est.analysis.builds == 2 and any(  # one probe per call
        "rebuilt at every call" in n for n in est.analysis.notes
    )


def test_registering_a_rule_rebuilds():
    class Scale(nn.Module):
        def forward(self, x):
            return 2.0 * x

    model = nn.Sequential(nn.Linear(3, 3), Scale()).double()
    est = lipreg.AutoLip(model, (3,), dtype=F64)
    before = est().value
    with restored_registries():
        lipreg.register_rule(Scale, lipreg.Nonlinear(5.0))  # sound but loose
        after = est().value
        assert after == pytest.approx(before * 5.0 / 2.0, rel=1e-7)
        assert est.analysis.builds == 2


def test_invalidation_is_logged(caplog):
    model = net(2)
    est = lipreg.AutoLip(model, SHAPE, certify=False)
    with caplog.at_level(logging.INFO, logger="lipreg.functional.analysis_cache"):
        est()
        model[6] = nn.Linear(4, 2)
        est()
    assert "first call" in caplog.text and "submodules" in caplog.text


def test_non_finite_weight_raises_through_the_cache():
    model = net(3)
    est = lipreg.AutoLip(model, SHAPE, certify=False)
    est()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*4\.weight"):
        est()


def test_cache_of_another_model_or_shape_is_refused():
    a, b = net(4), net(5)
    cache = AnalysisCache(a, SHAPE)
    with pytest.raises(ValueError, match="AnalysisCache"):
        lipreg.autolip(b, SHAPE, analysis=cache)
    with pytest.raises(ValueError, match="AnalysisCache"):
        lipreg.autolip(a, (2, 6, 6), analysis=cache)


def count_probes(monkeypatch) -> list[int]:
    calls = [0, 0]  # probes, traces
    probe, tracer = ProbeInterpreter.probe, torch.fx.Tracer.trace

    def counting_probe(self, *a, **k):
        calls[0] += 1
        return probe(self, *a, **k)

    def counting_trace(self, *a, **k):
        calls[1] += 1
        return tracer(self, *a, **k)

    monkeypatch.setattr(ProbeInterpreter, "probe", counting_probe)
    monkeypatch.setattr(torch.fx.Tracer, "trace", counting_trace)
    return calls


def test_certified_bound_traces_and_probes_once(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    calls = count_probes(monkeypatch)
    r = lipreg.certified_bound(model, (4,))
    assert r.certified and calls == [1, 1]


def test_tighten_reuses_the_autolip_analysis(monkeypatch):
    from lipreg.functional.tight import tighten

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    est = lipreg.AutoLip(model, (4,))
    base = est()
    calls = count_probes(monkeypatch)
    tight = tighten(model, (4,), base, analysis=est.analysis)
    assert calls == [0, 0]
    fresh = tighten(model, (4,), lipreg.autolip(model, (4,)))
    assert tight.value == fresh.value


# -------------------------------------------------------------------- one-sync finiteness


def test_nonfinite_names_is_exact():
    huge = torch.full((1000,), 3e38)  # finite elements whose sum overflows to +inf
    half = torch.full((100,), 60000.0, dtype=torch.float16)  # finite, fp16 sum would overflow
    nan, inf = torch.ones(5), torch.ones(5)
    nan[2], inf[4] = float("nan"), -float("inf")
    named = [("huge", huge), ("half", half), ("nan", nan), ("inf", inf), ("ok", torch.ones(3))]
    assert nonfinite_names(named) == ["nan", "inf"]
    assert nonfinite_names([("huge", huge), ("half", half), ("empty", torch.ones(0))]) == []


def test_check_finite_parameters_names_the_tensor():
    model = net(6)
    with torch.no_grad():
        model[1].running_mean[1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite.*1\.running_mean"):
        check_finite_parameters(model)


class InPlace(nn.Module):
    """An in-place update the probe rewires in the graph; a tensor attribute read by a
    ``get_attr`` node."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, bias=False).double()
        self.scale = torch.tensor(2.0, dtype=F64)

    def forward(self, x):
        y = self.lin(x)
        y.mul_(3.0)
        return y * self.scale


@pytest.mark.parametrize("change", ["weights", "attribute-in-place", "attribute-replaced"])
def test_rewired_graph_and_tensor_attributes_match_fresh(change, certify):
    model = InPlace()
    est = lipreg.AutoLip(model, (3,), dtype=F64, certify=certify)
    est()
    with torch.no_grad():
        if change == "weights":
            model.lin.weight.mul_(-2.0)
        elif change == "attribute-in-place":
            model.scale.fill_(5.0)
        else:
            model.scale = torch.tensor(7.0, dtype=F64)
    cached = est(state={})
    same(cached, lipreg.autolip(model, (3,), dtype=F64, certify=certify, state={}))
    truth = 3.0 * abs(model.scale.item()) * torch.linalg.matrix_norm(model.lin.weight, 2).item()
    assert cached.value == pytest.approx(truth, rel=1e-6)
    if certify:
        assert cached.value >= truth


_GLOBAL_SCALE = {"value": 1.0}


class _ReadsAGlobal(nn.Module):
    """forward() reads Python state outside the module: not in the cache's fingerprint."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) * _GLOBAL_SCALE["value"]


def test_a_certified_call_refuses_a_graph_the_model_no_longer_computes():
    """The trace froze ``× 1.0``; after the global changes to 3.0 the true constant is three
    times larger. An estimate may reuse the structure, a certificate re-checks it."""
    torch.manual_seed(0)
    net = _ReadsAGlobal()
    estimator = lipreg.AutoLip(net, (3,), certify=True)
    first = estimator()
    exact = float(torch.linalg.matrix_norm(net.fc.weight.double(), ord=2))
    assert first.value >= exact
    _GLOBAL_SCALE["value"] = 3.0
    try:
        with pytest.raises(Exception, match="does not compute what the model"):
            estimator()
    finally:
        _GLOBAL_SCALE["value"] = 1.0
