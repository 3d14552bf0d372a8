"""One FSDP2 step on CPU processes (gloo) that records each rank's local model-state bytes.

Run by tests/test_estimate_sharding.py as
``torchrun --standalone --nproc_per_node 2 tests/fsdp_memory_worker.py OUT_DIR``;
each rank writes ``OUT_DIR/rank{R}.json`` with the bytes of its local shards
(``DTensor.to_local()``) of weights, gradients and AdamW state, plus the
model's parameter counts. The model is tiny and random, fp32, with a frozen
bottom (embedding + first layer) and a trained top; some first dimensions are
odd (101, 7) so the two ranks' shards differ in size, as in real models.

``local_model_states`` is what a real FSDP run can call to be compared the
same way.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

VOCAB, WIDTH, HIDDEN, OUT = 101, 32, 64, 7


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of this rank's part of each tensor (a DTensor's local shard, else all of it)."""
    total = 0
    for t in tensors:
        part = t.to_local() if isinstance(t, DTensor) else t
        total += part.numel() * part.element_size()
    return total


def local_model_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Weights, gradients and optimizer state this rank holds, in bytes (step counters included)."""
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "weights": local_bytes(params),
        "gradients": local_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": local_bytes(state),
    }


def tiny_model() -> torch.nn.Sequential:
    """Embedding + 3 linear layers; the embedding and the first linear layer frozen."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, WIDTH),
        torch.nn.Linear(WIDTH, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.Linear(HIDDEN, OUT),
    )
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    return model


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model()
    counts = {
        "total": sum(p.numel() for p in model.parameters()),
        "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(rank))
    model(tokens).square().mean().backward()
    optimizer.step()
    record = {"rank": rank, "world": world, **counts, **local_model_states(model, optimizer)}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
