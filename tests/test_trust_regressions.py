"""Regression tests for the bug classes of issue 7 ("Trust").

Each test checks lipreg against an independent ground truth: a closed form (the spectral norm
of an affine map computed from the float64 weights), or the certified lower bound of
``tests/soundness/oracle.py`` (a float64 difference quotient, which no correct upper bound
can fall below). "Refused by name" means an ``UnsupportedOperationError``/``TraceError``
whose message names the op.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations as P

import lipreg
from tests.helpers import dense_conv_matrix, spectral_norm
from tests.soundness.generator import FlattenLinear
from tests.soundness.issue7 import (
    CASES,
    AddInplaceReturnAlias,
    AliasUpdate,
    AttnResidual,
    AttnThenLinear,
    GRUThenLinear,
    LSTMThenLinear,
    affine_norm,
    spectral,
)
from tests.soundness.oracle import fingerprint_diff, model_fingerprint, oracle_lower_bound

REL = 1e-6
REFUSALS = (lipreg.UnsupportedOperationError, lipreg.TraceError)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _sound(model: nn.Module, shape: Sequence[int], truth: float | None = None) -> float:
    """Certified AutoLip value, asserted >= the truth (or the oracle's lower bound)."""
    result = lipreg.autolip(model, tuple(shape))
    assert result.certified and result.kind == "upper", (result.certified, result.kind)
    assert math.isfinite(result.value), result.value
    if truth is None:
        truth = oracle_lower_bound(model, shape).lower
        what = "oracle lower bound"
    else:
        what = "exact Lipschitz constant"
    assert result.value >= truth * (1 - REL), f"certified {result.value:.6g} < {what} {truth:.6g}"
    return result.value


def _sound_or_refused(model: nn.Module, shape: Sequence[int], names: Sequence[str]) -> None:
    try:
        result = lipreg.autolip(model, tuple(shape))
    except REFUSALS as exc:
        msg = str(exc).lower()
        assert any(n.lower() in msg for n in names), f"refusal names none of {names}: {exc}"
        return
    lower = oracle_lower_bound(model, shape).lower
    assert result.certified and result.kind == "upper"
    assert result.value >= lower * (1 - REL), (
        f"certified {result.value:.6g} < oracle lower bound {lower:.6g}"
    )


# --- attention -------------------------------------------------------------------------------


def test_attention_then_linear_is_refused_or_sound() -> None:
    """Was: certified 0.0 (the attention output was taken for a constant)."""
    _sound_or_refused(AttnThenLinear(), (5, 8), ("MultiheadAttention", "attention"))


def test_attention_residual_is_refused_or_sound() -> None:
    """Was: ``x + attn(x)`` certified 1."""
    _sound_or_refused(AttnResidual(), (5, 8), ("MultiheadAttention", "attention"))


# --- subclasses overriding forward ------------------------------------------------------------


def test_lora_linear_subclass_certified_above_truth() -> None:
    """Was: the nn.Linear rule read ``self.weight`` and ignored ``W + A @ B``."""
    case = CASES["lora"]()
    _sound(case.model, case.input_shape, case.truth)


def test_scaled_linear_subclass_certified_above_truth() -> None:
    case = CASES["scaled_linear"]()  # 2.5 * super().forward(x)
    _sound(case.model, case.input_shape, case.truth)


def test_weight_standardised_conv_certified_above_truth() -> None:
    case = CASES["ws_conv"]()
    _sound(case.model, case.input_shape, case.truth)


def test_shape_changing_subclass_clear_error_or_sound() -> None:
    """Was: a raw RuntimeError from linear_map.py (shape mismatch)."""
    model = FlattenLinear(3 * 4 * 4, 5)
    try:
        result = lipreg.autolip(model, (3, 4, 4))
    except RuntimeError as exc:  # raw errors are the bug
        pytest.fail(f"raw {type(exc).__name__}: {exc}")
    except (*REFUSALS, ValueError) as exc:
        assert "FlattenLinear" in str(exc), f"the error does not name the module: {exc}"
        return
    assert result.certified and result.value >= spectral(model.weight) * (1 - REL), (
        result.value,
        spectral(model.weight),
    )


# --- shuffles in merged affine chains -------------------------------------------------------


@pytest.mark.parametrize("kind", ["pixel", "unshuffle", "channel"])
def test_shuffle_in_merged_chain_certified_above_truth(kind: str) -> None:
    """conv → PixelShuffle/PixelUnshuffle/ChannelShuffle → conv, merged into one map."""
    case = CASES[f"shuffle_{kind}"]()
    _sound(case.model, case.input_shape, case.truth)


# --- training-mode branches -----------------------------------------------------------------


def test_training_branch_bounds_the_eval_function() -> None:
    """``if self.training: y = 10 * y``: bounded in train mode, the bound is that of the
    eval-mode function (= ``fc``), and lower_bound stays below it."""
    case = CASES["training_branch"]()
    model = case.model
    assert model.training
    train_value = _sound(model, case.input_shape, case.truth)
    lower = lipreg.lower_bound(model, case.input_shape, n_random=64)
    assert model.training
    eval_value = lipreg.autolip(model.eval(), case.input_shape).value
    model.train()
    assert train_value == pytest.approx(eval_value, rel=1e-6), (train_value, eval_value)
    assert train_value == pytest.approx(case.truth, rel=1e-3), (train_value, case.truth)
    assert lower.value <= train_value * (1 + REL), (lower.value, train_value)
    assert lower.value <= case.truth * (1 + REL), (lower.value, case.truth)


# --- parametrizations: bounding never changes the model -------------------------------------


def _spectral_norm_model(train: bool) -> nn.Module:
    return nn.Sequential(
        P.spectral_norm(nn.Linear(8, 6)), nn.ReLU(), P.spectral_norm(nn.Linear(6, 3))
    ).train(train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("estimator", ["autolip", "lower_bound", "seqlip"])
def test_spectral_norm_buffers_unchanged(estimator: str, train: bool) -> None:
    """Was: ``_u``/``_v`` of the spectral_norm parametrization updated by bounding a
    train-mode model. Everything (params, buffers, flags) must be bit-identical."""
    model = _spectral_norm_model(train)
    before = model_fingerprint(model)
    rng = torch.random.get_rng_state()
    if estimator == "autolip":
        result = lipreg.autolip(model, (8,))
        assert result.value >= oracle_lower_bound(model, (8,)).lower * (1 - REL)
    elif estimator == "lower_bound":
        lipreg.lower_bound(model, (8,), n_random=16, n_anneal_steps=2, n_chains=2)
    else:
        lipreg.seqlip(model, (8,), method="exact")
    assert fingerprint_diff(before, model_fingerprint(model)) == []
    assert torch.equal(rng, torch.random.get_rng_state())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_spectral_norm_conv_certified_with_the_eval_weight(train: bool) -> None:
    """Was: a convolution's own certificate (the per-op product, reached here through a
    pooling in its chain and ``dense_limit=0``) read ``m.weight`` when asked, outside
    evaluation mode: a spectral-normed convolution in train mode then ran one more power
    iteration (``_u``/``_v`` updated) and was certified with that weight, ``W / σ_new``, not
    the ``W / σ_old`` the eval-mode network computes. With the original weight replaced after
    registration (stale ``u``, ``v``: ``σ_old`` far below ``‖W‖``), the eval-mode norm is several
    times the train-mode one. Truth: the exact matrix of conv then pool at the eval weight."""
    torch.manual_seed(0)
    conv = P.spectral_norm(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    with torch.no_grad():
        conv.parametrizations.weight.original.copy_(torch.randn(4, 3, 3, 3))
    model = nn.Sequential(conv, nn.AvgPool2d(2, stride=1)).train(train)
    with torch.no_grad():
        eval_weight = conv.eval().weight.double()
        train_weight = copy.deepcopy(conv).train().weight.double()
    model.train(train)
    conv_matrix = dense_conv_matrix(eval_weight, (6, 6), padding=1)
    truth = spectral_norm(_pool_matrix(4, 6) @ conv_matrix)
    wrong = spectral_norm(_pool_matrix(4, 6) @ dense_conv_matrix(train_weight, (6, 6), padding=1))
    assert truth > 2 * wrong  # the case tells the two weights apart
    before = model_fingerprint(model)
    result = lipreg.autolip(model, (3, 6, 6), dense_limit=0)
    assert fingerprint_diff(before, model_fingerprint(model)) == []
    (chain,) = [lb for lb in result.layers if lb.kind == "affine"]
    assert "fft" in chain.method  # the convolution's own certificate, in the product
    assert result.certified and result.value >= truth * (1 - 1e-9), (result.value, truth)


def _pool_matrix(channels: int, size: int) -> Tensor:
    """Exact matrix of ``AvgPool2d(2, stride=1)`` on ``channels × size × size``: each output
    averages its 2 × 2 window (float64)."""
    out = size - 1
    matrix = torch.zeros(channels * out * out, channels * size * size, dtype=torch.float64)
    for c in range(channels):
        for i in range(out):
            for j in range(out):
                row = (c * out + i) * out + j
                for di in (0, 1):
                    for dj in (0, 1):
                        matrix[row, (c * size + i + di) * size + j + dj] = 0.25
    return matrix


def test_weight_norm_and_orthogonal_certified_above_truth() -> None:
    for name in ("weight_norm_train", "orthogonal_eval"):
        case = CASES[name]()
        before = model_fingerprint(case.model)
        _sound(case.model, case.input_shape, case.truth)
        assert fingerprint_diff(before, model_fingerprint(case.model)) == [], name


# --- in-place updates through aliases -------------------------------------------------------


def test_inplace_alias_update_sound_or_refused() -> None:
    """``keep = a; a += g(a); return a + keep`` (keep IS the updated a: L = 2·L(a + g(a)))."""
    _sound_or_refused(AliasUpdate(), (6,), ("iadd", "in place", "in-place", "alias"))


def test_inplace_add_then_return_alias_sound_or_refused() -> None:
    """``y.add_(g(y)); return y``."""
    _sound_or_refused(AddInplaceReturnAlias(), (6,), ("add_", "in place", "in-place", "alias"))


class _IMulAlias(nn.Module):
    """``b = a; b *= 3; return a``: found by the harness (certified ~3× too small)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        a = self.fc(x)
        b = a
        b *= 3.0
        return a


def test_inplace_imul_through_alias_sound_or_refused() -> None:
    model = _IMulAlias()
    _sound_or_refused(model, (6,), ("imul", "mul", "in place", "in-place", "alias"))


# --- lower bound of a constant network ------------------------------------------------------


def test_lower_bound_of_zero_network_is_zero() -> None:
    """Was: 1 (a default where no Jacobian was non-zero)."""
    model = nn.Linear(5, 3)
    with torch.no_grad():
        model.weight.zero_()
    result = lipreg.lower_bound(model, (5,), inputs=torch.randn(16, 5))
    assert result.kind == "lower"
    assert result.value == 0.0, result.value


# --- non-finite constants outside parameters and buffers ------------------------------------


class _NaNAttr(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = torch.tensor([1.0, float("nan"), 2.0, 0.5])  # a plain attribute

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.scale


def test_nan_in_plain_tensor_attribute_raises() -> None:
    """Was: ``kind == "upper"`` with value nan."""
    with pytest.raises(ValueError, match="non-finite"):
        lipreg.autolip(_NaNAttr(), (4,))


# --- ops that mix samples -------------------------------------------------------------------


class _SoftmaxDim0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(self.fc(x), dim=0)


def test_softmax_over_batch_dim_refused() -> None:
    """softmax over dim 0 couples the samples of a batch: no per-sample function exists."""
    with pytest.raises(lipreg.UnsupportedOperationError, match=r"(?i)softmax"):
        lipreg.autolip(_SoftmaxDim0(), (5,))


# --- models that are not one function of one tensor -----------------------------------------


class _NoForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 3)
        self.decoder = nn.Linear(3, 4)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.a(x) + self.b(y)


def test_model_without_forward_names_the_fix() -> None:
    with pytest.raises(Exception) as info:
        lipreg.autolip(_NoForward(), (4,))
    msg = str(info.value)
    assert "forward" in msg, msg
    assert "model_attr" in msg, msg
    assert "encoder" in msg, msg  # the sub-networks to choose from


def test_two_input_forward_names_the_fix() -> None:
    with pytest.raises(Exception) as info:
        lipreg.autolip(_TwoInputs(), (4,))
    msg = str(info.value)
    assert not isinstance(info.value, RuntimeError | NotImplementedError), msg
    assert "wrap" in msg.lower(), msg
    assert "input" in msg.lower(), msg


def test_compiled_submodule_unwrapped_or_named() -> None:
    """A ``torch.compile``-d submodule: bounded through ``_orig_mod`` (soundly, the compiled
    function is the eager one) or an error telling to unwrap ``_orig_mod``."""
    lin = nn.Linear(6, 4)
    model = nn.Sequential(torch.compile(lin), nn.ReLU(), nn.Linear(4, 2))
    try:
        result = lipreg.autolip(model, (6,))
    except Exception as exc:
        assert "_orig_mod" in str(exc), f"{type(exc).__name__}: {exc}"
        return
    eager = nn.Sequential(lin, nn.ReLU(), model[2])
    assert result.certified and result.value >= oracle_lower_bound(eager, (6,)).lower * (1 - REL)


# --- refusals explain themselves ------------------------------------------------------------


class _LayerNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(6, 6), nn.LayerNorm(6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.fc(x))


@pytest.mark.parametrize(
    ("name", "build", "shape", "op"),
    [
        ("layernorm", _LayerNormNet, (6,), "LayerNorm"),
        ("attention", AttnThenLinear, (5, 8), "MultiheadAttention"),
        ("gru", GRUThenLinear, (4, 6), "GRU"),
        ("lstm", LSTMThenLinear, (4, 6), "LSTM"),
    ],
)
def test_refusal_names_reason_without_register_rule(
    name: str, build: type[nn.Module], shape: tuple[int, ...], op: str
) -> None:
    """Not-globally-Lipschitz ops are refused with the reason; advising ``register_rule``
    would invite a wrong bound."""
    with pytest.raises(REFUSALS) as info:
        lipreg.autolip(build(), shape)
    msg = str(info.value)
    assert op in msg, msg
    assert "register_rule" not in msg, msg
    assert "lipschitz" in msg.lower() or "product" in msg.lower() or "multipl" in msg.lower(), msg


def test_affine_norm_helper_matches_closed_form() -> None:
    """The ground truth used above: affine_norm of a Linear is its spectral norm."""
    lin = nn.Linear(7, 4)
    assert affine_norm(lin, (7,)) == pytest.approx(spectral(lin.weight), rel=1e-9)
