"""Training one model in several processes (torchrun): PyTorch's own engines, not a new one.

- Data-parallel: `DistributedDataParallel` (gloo on CPU, nccl on GPU) averages the gradients in buckets while the
  backward pass still runs. Every process holds the whole model; this is what LoRA and one-GPU-sized models use.
- Sharded: FSDP (`fully_shard`) splits every parameter, its gradient and its AdamW state over the processes, each
  encoder and decoder block gathered only while it computes, so full fine-tuning of the 8B model fits GPUs that
  could not hold its 16 bytes a parameter alone. Parameters become DTensors; `full` and `shard_like` move tensors
  between a checkpoint's whole ones and a process's shards.

Both engines hook a module's `forward`, so they wrap `Objective`, whose forward is `QwenAudio.loss`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

# FSDP's modules (torch.distributed.fsdp and .tensor, which bring sympy) are imported in the functions that use them:
# at the top they cost every `qwenaudio` command 0.6-1.2 s at start, and only training reaches them.

from .core.model import QwenAudio


class Objective(nn.Module):
    """`QwenAudio.loss` as a module's forward: the call DistributedDataParallel and FSDP put their hooks on."""

    def __init__(self, model: QwenAudio):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor, audio: Sequence[Tensor]) -> Tensor:
        return self.model.loss(input_ids, labels, attention_mask, audio)


def wrap(model: QwenAudio, world: int, shard: bool) -> nn.Module:
    """The module training calls: `Objective(model)` alone in one process, under DistributedDataParallel in
    several, or sharded over them with FSDP when `shard` (one unit per encoder and decoder block, the embeddings,
    lm_head and the rest in the root unit; one process has nothing to shard over). Gradients come out averaged over
    the processes. Call it after choosing what trains (`requires_grad`): data-parallel tracks only those."""
    objective = Objective(model)
    if world == 1:
        return objective
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(model.device.type, (world,))
        for block in (*model.encoder.blocks, *model.decoder.blocks):
            fully_shard(block, mesh=mesh)
        fully_shard(objective, mesh=mesh)
        return objective
    # The buffers (rotary tables, int8 weights under LoRA) are constants: nothing to send before every forward.
    # torch 2.13 renamed the switch; the GPU images still run older versions.
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(objective, device_ids=[model.device] if model.device.type == "cuda" else None,
                                   **{quiet: False})


@contextmanager
def syncing(module: nn.Module, sync: bool) -> Iterator[None]:
    """Within the block, backward passes average the gradients over the processes only when `sync`: gradient
    accumulation syncs on a step's last pass alone."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, DistributedDataParallel):
        with nullcontext() if sync else module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def full(tensor: Tensor) -> Tensor:
    """The whole tensor of a sharded parameter or optimizer state (every process must call it together), else the
    tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(like: Tensor, tensor: Tensor) -> Tensor:
    """A whole `tensor` (read from a checkpoint) cut as the sharded `like` is: this process's part of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements) if isinstance(
        like, DTensor) else tensor
