"""``LipschitzCallback`` at zero configuration on eight common shapes of LightningModule.

Each test runs a real ``trainer.fit`` (CPU, a few steps) with ``LipschitzCallback`` and only a
short ``every_n_train_steps`` set, then checks what was logged — a finite ``lipschitz/*``
value in ``trainer.callback_metrics``, compared with an independent value where one exists —
or that exactly one clear warning (naming the cause and the fix) was emitted while the fit
still completed.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lipreg
from lipreg.callback import LipschitzCallback
from tests._lightning_helpers import (
    RegressionModule,
    callback_warnings,
    make_mlp,
    make_trainer,
    norm_product,
    regression_data,
    rel,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("seeded")

STEPS = 2


def check_autolip(
    value: float, net: nn.Module, input_shape: tuple[int, ...], tol: float, certify: bool = True
) -> None:
    """``value`` is the AutoLip estimate of ``net`` at ``input_shape`` (final weights).

    The callback's first estimate is a cold start with the default seed, so a fresh
    estimator with the callback's ``tol`` reproduces it (to rounding); and it may not exceed
    the certified bound, which for a Linear/activation MLP is the product of the spectral norms.
    """
    fresh = lipreg.autolip(net, input_shape, certify=False, tol=tol)
    assert rel(value, fresh.value) < 1e-6
    if not certify:
        return
    certified = lipreg.autolip(net, input_shape)
    # The estimate is computed in float32: converged, it may exceed the norm by rounding.
    assert certified.certified and value <= certified.value * (1 + 1e-5)
    if all(isinstance(m, nn.Linear | nn.ReLU | nn.LeakyReLU) for m in net.children()):
        assert rel(certified.value, norm_product(net)) < 1e-6


def metric(trainer: pl.Trainer, key: str) -> float:
    assert key in trainer.callback_metrics, sorted(trainer.callback_metrics)
    value = float(trainer.callback_metrics[key])
    assert math.isfinite(value), (key, value)
    return value


def lipschitz_keys(trainer: pl.Trainer) -> list[str]:
    return [k for k in trainer.callback_metrics if k.startswith("lipschitz/")]


def fit(tmp_path, module: pl.LightningModule, data: Any, *, callback_kwargs=None, **trainer_kwargs):
    """Fit with a zero-configuration callback (only a short cadence, plus
    ``callback_kwargs``); return the trainer and the callback."""
    callback = LipschitzCallback(every_n_train_steps=STEPS, **(callback_kwargs or {}))
    trainer = make_trainer(tmp_path, [callback], max_steps=STEPS, **trainer_kwargs)
    trainer.fit(module, data)
    assert trainer.global_step >= STEPS  # the fit ran to the end
    return trainer, callback


def fit_quietly(tmp_path, module: pl.LightningModule, data: Any, **kwargs: Any):
    """:func:`fit`, checking that the callback warned nothing."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer, callback = fit(tmp_path, module, data, **kwargs)
    assert callback_warnings(records) == []
    return trainer, callback


def images(n: int = 8, channels: int = 1, size: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, channels, size, size, generator=g))


# ---------------------------------------------------------------- (1) autoencoder, no forward
class AutoEncoder(pl.LightningModule):
    """Encoder/decoder attributes used by training_step; no forward()."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 4))
        self.decoder = nn.Sequential(nn.Linear(4, 64), nn.Unflatten(1, (1, 8, 8)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return nn.functional.mse_loss(self.decoder(self.encoder(x)), x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_autoencoder_without_forward_warns_once_and_trains(tmp_path):
    module = AutoEncoder()
    with pytest.warns(UserWarning) as records:
        trainer, _ = fit(tmp_path, module, DataLoader(images(), batch_size=4))
    (message,) = callback_warnings(records)
    assert "AutoEncoder (the LightningModule) has no forward()" in message
    assert "encoder (Sequential" in message and "decoder (Sequential" in message
    assert "model_attr='encoder'" in message
    assert "training continues" in message
    assert lipschitz_keys(trainer) == []


def test_autoencoder_with_model_attr_bounds_the_encoder(tmp_path):
    module = AutoEncoder()
    data = DataLoader(images(), batch_size=4)
    trainer, callback = fit_quietly(
        tmp_path, module, data, callback_kwargs={"model_attr": "encoder"}
    )
    assert callback.input_shape == (1, 8, 8)
    check_autolip(metric(trainer, "lipschitz/autolip"), module.encoder, (1, 8, 8), callback.tol)


# ---------------------------------------------------------------- (2) dict batches
class KeyedDataset(Dataset):
    """Samples as dicts with the keys in a given order (batches collate to such dicts)."""

    def __init__(self, keys: tuple[str, ...], label: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 6, generator=g)
        if label == "int":  # class indices: int64, shape (B,) once batched
            self.y = torch.randint(0, 3, (16,), generator=g)
        else:  # float regression targets of another width than x
            self.y = torch.randn(16, 3, generator=g)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        values = {"x": self.x[i], "y": self.y[i]}
        return {k: values[k] for k in self.keys}


class DictModule(RegressionModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self(batch["x"])
        if batch["y"].dtype == torch.int64:
            return nn.functional.cross_entropy(out, batch["y"])
        return nn.functional.mse_loss(out, batch["y"])


@pytest.mark.parametrize(
    ("keys", "label"),
    [(("x", "y"), "float"), (("y", "x"), "float"), (("y", "x"), "int")],
    ids=["x-first", "float-label-first", "int-label-first"],
)
def test_dict_batches_in_any_key_order(tmp_path, keys, label):
    module = DictModule()
    loader = DataLoader(KeyedDataset(keys, label), batch_size=4)
    assert list(next(iter(loader))) == list(keys)
    trainer, callback = fit_quietly(tmp_path, module, loader)
    assert callback.input_shape == (6,)  # the label was rejected by the forward check
    assert callback._input_path == ("x",)
    check_autolip(metric(trainer, "lipschitz/autolip"), module.net, (6,), callback.tol)


# ---------------------------------------------------------------- (3) torchvision ResNet-18
class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_torchvision_resnet18_is_bounded_in_eval_mode(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    module = Classifier(torchvision.models.resnet18(num_classes=10))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,)))
    # certifying ResNet-18 takes ~30 s here: no certificate at the fit end either
    trainer, callback = fit_quietly(
        tmp_path,
        module,
        DataLoader(data, batch_size=4),
        # the estimate alone, at its exact cadence (no budget on this 2-step fit)
        callback_kwargs={
            "compute_at_fit_end": False,
            "certify_every_n_train_steps": 0,
            "max_overhead": None,
        },
    )
    assert callback.input_shape == (3, 32, 32)
    assert callback.methods == ["autolip"]  # residual: not sequential, SeqLip off
    assert module.training  # BatchNorm was bounded in eval mode, the module left in train
    # (certifying ResNet-18 takes ~30 s here: the estimate is compared, not the certificate)
    check_autolip(
        metric(trainer, "lipschitz/autolip"), module.net, (3, 32, 32), callback.tol, certify=False
    )


# ---------------------------------------------------------------- (4) two-input forward
class TwoInput(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = make_mlp()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.body(x) - y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self(x, y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_two_input_forward_warns_once_and_trains(tmp_path):
    with pytest.warns(UserWarning) as records:
        trainer, _ = fit(tmp_path, TwoInput(), DataLoader(regression_data(16), batch_size=4))
    (message,) = callback_warnings(records)
    assert "TwoInput (the LightningModule).forward takes 2 required inputs" in message
    assert "(forward(x, y))" in message
    assert "model_attr=" in message and "wrap" in message
    assert "model_attr='body'" in message
    assert lipschitz_keys(trainer) == []


# ---------------------------------------------------------------- (5) small transformer
class TinyTransformer(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_transformer_is_refused_by_autolip_and_gets_a_lower_bound(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 4, 8, generator=g), torch.randn(8, 2, generator=g))
    module = TinyTransformer()
    with pytest.warns(UserWarning) as records:
        # the cadence alone: a 2-step fit cannot afford a lower bound within a 5 % budget
        trainer, callback = fit(
            tmp_path,
            module,
            DataLoader(data, batch_size=4),
            callback_kwargs={"max_overhead": None},
        )
    (message,) = callback_warnings(records)
    assert "AutoLip cannot bound TinyTransformer at input shape (4, 8)" in message
    assert "Error" in message  # the core's reason (TraceError / UnsupportedOperationError)
    assert "Falling back to lipschitz/lower_bound" in message
    assert callback.methods == ["lower_bound"]
    assert metric(trainer, "lipschitz/lower_bound") > 0
    assert "lipschitz/autolip" not in trainer.callback_metrics


# ---------------------------------------------------------------- (6) GAN, manual optimisation
class GAN(pl.LightningModule):
    """Generator + discriminator, two optimizers, manual optimisation, no forward()."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 4)
        fake = self.generator(z)
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        loss_d = bce(self.discriminator(real), ones) + bce(self.discriminator(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = bce(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.generator.parameters(), lr=0.01),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.01),
        )


def gan_data() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(16, 6)), batch_size=4)


def test_gan_with_manual_optimisation_warns_once_and_trains(tmp_path):
    with pytest.warns(UserWarning) as records:
        trainer, _ = fit(tmp_path, GAN(), gan_data())
    (message,) = callback_warnings(records)
    assert "GAN (the LightningModule) has no forward()" in message
    assert "generator (Sequential" in message and "discriminator (Sequential" in message
    assert "model_attr='generator'" in message
    assert lipschitz_keys(trainer) == []


def test_gan_discriminator_bounded_with_model_attr(tmp_path):
    module = GAN()
    trainer, callback = fit_quietly(
        tmp_path, module, gan_data(), callback_kwargs={"model_attr": "discriminator"}
    )
    assert trainer.global_step == STEPS  # one batch: two optimizer steps
    assert callback.input_shape == (6,)
    # LeakyReLU(0.2) has slopes in [0.2, 1]: AutoLip is the product of the Linear norms.
    check_autolip(metric(trainer, "lipschitz/autolip"), module.discriminator, (6,), callback.tol)


# ---------------------------------------------------------------- (7) torch.compile
class CompiledModule(RegressionModule):
    """``self.net`` is a compiled MLP (or an MLP with a compiled block inside)."""

    def __init__(self, nested: bool) -> None:
        layers = list(make_mlp())
        # the same modules without any compiled wrapper: the test's reference network
        plain = nn.Sequential(*layers)
        if nested:
            net: nn.Module = nn.Sequential(torch.compile(layers[0], backend="eager"), *layers[1:])
        else:
            net = torch.compile(nn.Sequential(*layers), backend="eager")
        super().__init__(net)
        self.plain = [plain]  # a plain list: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("model_attr", [None, "net"])
@pytest.mark.parametrize("nested", [False, True], ids=["compiled-attribute", "compiled-inside"])
def test_compiled_modules_are_unwrapped(tmp_path, nested, model_attr):
    # backend="eager" keeps the test fast: the wrapper (OptimizedModule, ._orig_mod) is the
    # same as with inductor, whose first compilation alone takes ~20 s on this machine.
    from torch._dynamo.eval_frame import OptimizedModule

    module = CompiledModule(nested)
    assert any(isinstance(m, OptimizedModule) for m in module.modules())
    data = DataLoader(regression_data(16), batch_size=4)
    trainer, callback = fit_quietly(
        tmp_path, module, data, callback_kwargs={"model_attr": model_attr}
    )
    assert any(isinstance(m, OptimizedModule) for m in module.modules())  # left compiled
    assert callback.methods == ["autolip", "seqlip"]
    check_autolip(metric(trainer, "lipschitz/autolip"), module.plain[0], (6,), callback.tol)
    # The layers are named after the original modules, not the compiled wrapper's _orig_mod.
    prefix = "net." if model_attr is None else ""
    layers = sorted(k for k in trainer.callback_metrics if k.startswith("lipschitz/layer/"))
    assert layers == [f"lipschitz/layer/{prefix}{i}" for i in (0, 2, 4)]


# ---------------------------------------------------------------- (8) bf16-mixed
def test_bf16_mixed_zero_config(tmp_path):
    module = RegressionModule(lr=0.1)
    data = DataLoader(regression_data(16), batch_size=4)
    trainer, callback = fit_quietly(tmp_path, module, data, precision="bf16-mixed")
    assert callback.input_shape == (6,)
    check_autolip(metric(trainer, "lipschitz/autolip"), module.net, (6,), callback.tol)
