"""Prototype (issue 10, item 9): do Lightning's sharded strategies run on CPU with gloo?

Runs a 2-step fit of a tiny MLP on ``accelerator="cpu", devices=2`` under one strategy, with a
callback that reports, on every rank, what a callback sees: the parameters' types and local
shapes, whether ``torch.fx`` / ``lipreg.functional.trace.trace`` works on the module, and
whether ``lipreg.autolip`` runs on it as is.

Strategies (argv[1]):
  fsdp           ``FSDPStrategy()`` (torch FSDP1, ``FullyShardedDataParallel``)
  fsdp_orig      ``FSDPStrategy(use_orig_params=True)``
  fsdp_subclass  a trivial subclass of ``FSDPStrategy`` (the accelerator check tests the exact type)
  fsdp_subclass_manual  the subclass, and ``configure_model`` wrapping each Linear and the net
                 in ``FullyShardedDataParallel(device_id=torch.device("cpu"))`` itself
  model_parallel ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with
                 ``fully_shard`` (FSDP2) in ``configure_model``
  model_parallel_default  ``ModelParallelStrategy()`` (mesh data 1 x tensor 2)

Under the sharded strategies the callback also computes the certified AutoLip one merged map at
a time (``sharded_autolip`` of h7_fsdp_autolip.py: all ranks gather the same map in the same
order), checks that the ranks agree bit for bit, and compares with ``lipreg.autolip`` of a plain
copy gathered whole (done here only as the reference).
Run: OMP_NUM_THREADS=1 MASTER_PORT=$((20000 + RANDOM % 20000)) \
     .venv/bin/python docs/design/issue10/prototypes/h7_lightning_cpu.py fsdp
"""

# ruff: noqa: E501  (prototype: long report lines)
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import traceback

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

import lipreg
from lipreg.functional.trace import trace


class SubclassedFSDP(FSDPStrategy):
    """No change: only a type that is not exactly ``FSDPStrategy``."""


class Tiny(pl.LightningModule):
    def __init__(self, wrap: str) -> None:
        super().__init__()
        self.wrap = wrap
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
        )

    def configure_model(self) -> None:
        if self.wrap == "fsdp1_cpu":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            for i, layer in enumerate(self.net):
                if isinstance(layer, nn.Linear):
                    self.net[i] = FSDP(layer, device_id=torch.device("cpu"))
            self.net = FSDP(self.net, device_id=torch.device("cpu"))
            return
        if self.wrap != "fsdp2":
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Inspect(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx != 0:
            return
        r = trainer.global_rank
        lines = [f"[rank {r}] module type: {type(pl_module.net).__name__}"]
        for name, p in pl_module.named_parameters():
            lines.append(
                f"[rank {r}] param {name}: {type(p).__name__} local {tuple(p.to_local().shape) if hasattr(p, 'to_local') else tuple(p.shape)} global {tuple(p.shape)}"
            )
        for what, fn in (
            ("lipreg trace", lambda: trace(pl_module.net)),
            ("autolip", lambda: lipreg.autolip(pl_module.net, (8,)).value),
        ):
            try:
                out = fn()
                lines.append(
                    f"[rank {r}] {what}: OK {out if isinstance(out, float) else type(out).__name__}"
                )
            except Exception as e:  # record what a user would see
                lines.append(
                    f"[rank {r}] {what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                )
        if self_fsdp2(pl_module):
            lines += sharded_values(pl_module.net, r)
        print("\n".join(lines), flush=True)


def self_fsdp2(pl_module) -> bool:
    return pl_module.wrap == "fsdp2" and pl_module.device_mesh["data_parallel"].size() > 1


def sharded_values(net: nn.Module, rank: int) -> list[str]:
    """The callback's computation under FSDP2: one merged map gathered at a time, every rank."""
    import torch.distributed as dist
    from h7_fsdp_autolip import gather_fsdp2_full_tensor, plain_copy, sharded_autolip

    maps = [([0], (8,)), ([2], (16,)), ([4], (16,))]
    value, per_map = sharded_autolip(net, maps, gather_fsdp2_full_tensor)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    whole = nn.Sequential(
        *[
            plain_copy(m, {k: p.full_tensor() for k, p in m.named_parameters(recurse=False)})
            if isinstance(m, nn.Linear)
            else m
            for m in net
        ]
    )
    ref = lipreg.autolip(whole, (8,)).value
    return [
        f"[rank {rank}] one map at a time: {value!r} (maps {per_map}); ranks agree bitwise: {len(set(everyone)) == 1}; whole-model reference {ref!r}; equal: {value == ref}"
    ]


def main(kind: str) -> None:
    torch.manual_seed(0)
    strategy = {
        "fsdp": lambda: FSDPStrategy(),
        "fsdp_orig": lambda: FSDPStrategy(use_orig_params=True),
        "fsdp_subclass": lambda: SubclassedFSDP(),
        "fsdp_subclass_orig": lambda: SubclassedFSDP(use_orig_params=True),
        "fsdp_subclass_manual": lambda: SubclassedFSDP(),
        # the default mesh is (num_nodes, devices) = data 1 x tensor 2: shard on a data mesh of 2
        "model_parallel": lambda: ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1
        ),
        "model_parallel_default": lambda: ModelParallelStrategy(),
    }[kind]()
    data = torch.utils.data.TensorDataset(torch.randn(16, 8), torch.randn(16, 4))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Inspect()],
    )
    wrap = (
        "fsdp2"
        if kind.startswith("model_parallel")
        else "fsdp1_cpu"
        if kind == "fsdp_subclass_manual"
        else "none"
    )
    trainer.fit(Tiny(wrap), loader)
    print(
        f"[rank {trainer.global_rank}] fit finished under {type(trainer.strategy).__name__}",
        flush=True,
    )


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception as e:
        print(f"[pid {os.getpid()}] FAILED: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=3)
        sys.exit(1)
