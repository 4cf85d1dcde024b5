"""The graph interpreter, the probe and the analysis' readable labels.

Ground truths: ``model.eval()(x)`` itself (the interpreter must reproduce it bit for bit), the
model's own state before the call (nothing may change), counts of probe runs, and the module
paths of ``named_modules()``.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lipreg
from lipreg.functional.analysis import analyse
from lipreg.functional.probe import ProbeInterpreter
from lipreg.functional.trace import GraphInterpreter, eval_function, trace
from lipreg.models import mnist_cnn4


class _Residual(nn.Module):
    """Function calls (F.relu, +, flatten, .view) between modules, BatchNorm and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(2 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x))) + x
        y = self.drop(y)
        if self.training:  # the evaluation-mode function never takes this branch
            y = y * 100.0
        return self.fc(torch.flatten(y, 1)).view(x.shape[0], -1)


def _bn_dropout_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2)
    )


def _trained_statistics(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Non-trivial running statistics (a few training-mode forwards), then train mode."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(4, *shape, generator=gen) * 2 + 0.5)
    return model.train()


NETS = {
    "mnist_cnn4": (mnist_cnn4, (1, 28, 28)),
    "bn_dropout_mlp": (_bn_dropout_mlp, (6,)),
    "residual": (_Residual, (2, 5, 5)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=5), (3, 32, 32)),
}


def _state(model: nn.Module) -> tuple[list[bool], dict[str, torch.Tensor]]:
    return [m.training for m in model.modules()], copy.deepcopy(model.state_dict())


@pytest.mark.parametrize("name", list(NETS))
def test_eval_function_is_bit_identical_to_eval_mode_and_changes_nothing(name: str) -> None:
    torch.manual_seed(0)
    build, shape = NETS[name]
    model = _trained_statistics(build(), shape)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    fn, how = eval_function(model)
    assert how == "fx"
    flags, state = _state(model)
    with torch.no_grad():
        got = fn(x)
    assert [m.training for m in model.modules()] == flags  # train mode is kept
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # running stats untouched
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
    assert torch.equal(got, expected)


def test_interpreter_fires_no_hook_and_reads_replaced_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append("hook"))
    with pytest.warns(UserWarning, match="forward hooks"):
        gm = trace(model)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    interpreter = GraphInterpreter(gm)
    with torch.no_grad():
        assert torch.equal(interpreter.run(x), model[2](model[1](model[0].forward(x))))
        # A parameter replaced after tracing (assign=True) is read from the live model.
        new = {k: v + 1.0 for k, v in model.state_dict().items()}
        model.load_state_dict(new, assign=True)
        assert torch.equal(interpreter.run(x), model[2](model[1](model[0].forward(x))))
    assert calls == []


def test_interpreter_keeps_op_error_messages() -> None:
    gm = trace(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(RuntimeError) as err:
        GraphInterpreter(gm).run(torch.randn(2, 4))
    assert "While executing" not in str(err.value)  # fx's rewriting is off


def _count_probes():
    return mock.patch.object(
        ProbeInterpreter, "probe", autospec=True, side_effect=ProbeInterpreter.probe
    )


def test_one_certified_autolip_call_probes_once() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    with _count_probes() as probe:
        result = lipreg.autolip(net, (1, 4, 4), dense_limit=0)  # float64 certificates
    assert result.certified
    assert probe.call_count == 1


def test_at_dtype_keeps_nodes_and_does_not_probe() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    analysis = analyse(net, (3,))
    with _count_probes() as probe:
        other = analysis.at_dtype(torch.float64)
    assert probe.call_count == 0
    assert other.order == analysis.order and set(other.specs) == set(analysis.specs)
    weights = [s.weight for s in other.specs.values() if getattr(s, "weight", None) is not None]
    assert weights and all(w.dtype == torch.float64 for w in weights)


def _labels(model: nn.Module, shape: tuple[int, ...]) -> list[str]:
    analysis = analyse(model, shape)
    return [analysis.label(n) for n in analysis.order]


def test_resnet18_labels_are_module_paths_and_unique() -> None:
    labels = _labels(torchvision.models.resnet18(num_classes=5), (3, 32, 32))
    assert len(set(labels)) == len(labels)
    for expected in ["conv1", "layer1.0.conv1", "layer1.0.relu#1", "layer1.0.relu#2"]:
        assert expected in labels
    assert {"layer1.0 (add)", "layer4.1 (add)", "flatten", "fc"} <= set(labels)
    assert not [s for s in labels if s.startswith(("add", "relu_"))]  # no raw fx names


def test_repeated_ops_of_one_module_are_numbered() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(F.relu(self.lin(x)) + x) + x

    labels = _labels(nn.Sequential(Twice()), (3,))
    assert labels[1:] == ["0.lin", "0 (relu#1)", "0 (add#1)", "0 (relu#2)", "0 (add#2)"]


@pytest.mark.parametrize("attr", ["model", "net"])
def test_lightning_module_labels_are_its_module_paths(attr: str) -> None:
    """A LightningModule traced as a whole: every label is a path of its named_modules()
    (the attribute included), so get_submodule finds each module; ops name their module."""
    from lightning.pytorch import LightningModule

    class Wrapper(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            setattr(self, attr, torchvision.models.resnet18(num_classes=5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self, attr)(x)

    wrapper = Wrapper()
    analysis = analyse(wrapper, (3, 32, 32))
    labels = [analysis.label(n) for n in analysis.order]
    plain = _labels(torchvision.models.resnet18(num_classes=5), (3, 32, 32))
    assert len(labels) == len(plain)
    assert labels[1:] == [f"{attr} ({p})" if p == "flatten" else f"{attr}.{p}" for p in plain[1:]]
    for node in analysis.order:
        if node.op == "call_module":
            wrapper.get_submodule(analysis.label(node).split("#")[0])


def test_lightning_module_with_its_own_ops() -> None:
    from lightning.pytorch import LightningModule

    class Scaled(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 3), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * self.net(x)

    assert _labels(Scaled(), (3,)) == ["x", "net.0", "net.1", "mul"]
