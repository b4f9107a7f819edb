"""One process of the distributed tests in ``test_adapt_training.py``: SGD on a wrapped tiny LLaMA.

Run as ``python ddp_worker.py RANK WORLD_SIZE PORT OUT [nf4|fsdp2|fsdp1]``. Every process
builds the same model and the same global batch from fixed seeds; with
``WORLD_SIZE == 2`` it joins a gloo process group on 127.0.0.1:PORT, trains
``torch.nn.parallel.DistributedDataParallel`` on its half of the batch, and
with ``WORLD_SIZE == 1`` it trains the plain model on the whole batch. With
``nf4`` the model is wrapped by QDoTA and DDP gets ``broadcast_buffers=False``,
as docs/how-to/distributed.md advises (the residuals are buffers). The
trained cores go to ``OUT`` as safetensors; the test calls :func:`train`
itself for the single-process reference. With ``fsdp2`` the model is sharded by
``fully_shard`` (each decoder layer, then the whole) instead, and after training
every rank calls ``save_adapter(model, OUT/adapter)`` and ``merge_and_unload``;
``OUT/logits-RANK.safetensors`` holds the merged model's logits on the batch. With
``fsdp1`` the model is wrapped by ``FullyShardedDataParallel`` (a unit per decoder
layer, ``use_orig_params=True``) and every rank calls ``save_adapter`` inside
``summon_full_params``, as docs/how-to/distributed.md says (rank 0 writes).
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
from conftest import TINY_LLAMA
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import mpo.adapt

STEPS = 3
GLOBAL_BATCH = 4
SEQUENCE = 8
VOCAB = TINY_LLAMA["vocab_size"]


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))


def global_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQUENCE), generator=generator)


def train(
    rank: int, world_size: int, port: int, quantize: str | None = None, out: str | None = None
) -> dict:
    """The cores after ``STEPS`` SGD steps, by name (contiguous, for safetensors)."""
    sharding = quantize if quantize in ("fsdp1", "fsdp2") else None
    quantize = None if sharding else quantize
    extra = {"quantize": quantize, "dtype": "float32"} if quantize else {}
    model = mpo.adapt.wrap(base_model(), rank=4, num_cores=3, quiet=True, **extra)
    batch = global_batch()
    shard = batch.chunk(world_size)[rank]
    trained = model
    if world_size > 1:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            # a rank that died must not hang the other; a loaded 2-core machine may start
            # one rank tens of seconds after the other
            timeout=timedelta(seconds=120),
        )
        if sharding == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # fully_shard's default mesh is on the accelerator when there is one, where
            # this cpu model under gloo crashed both ranks (torch 2.11 on a GPU machine)
            mesh = init_device_mesh("cpu", (world_size,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            trained = fully_shard(model, mesh=mesh)
        elif sharding == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer

            trained = FullyShardedDataParallel(
                model,
                auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                use_orig_params=True,
                device_id=torch.device("cpu"),
            )
        else:
            trained = torch.nn.parallel.DistributedDataParallel(
                model, broadcast_buffers=quantize is None
            )
    optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        # The loss is a mean over the shard's tokens and DDP averages over ranks,
        # so with equal shards the gradient is that of the global batch's mean loss.
        trained(input_ids=shard, labels=shard).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if sharding == "fsdp1":  # every rank gathers, rank 0 writes
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trained, writeback=False):
            mpo.adapt.save_adapter(trained.module, f"{out}/adapter")
    if sharding == "fsdp2":  # every rank: the cores are gathered, rank 0 writes
        mpo.adapt.save_adapter(model, f"{out}/adapter")
        mpo.adapt.merge_and_unload(model)
        with torch.no_grad():
            logits = model(input_ids=batch).logits
        save_file({"logits": logits.contiguous()}, f"{out}/logits-{rank}.safetensors")
    if world_size > 1:
        # Rank 0 hosts the rendezvous store: leaving before the others are done with
        # it would hang them, so everyone meets once more before tearing down.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {
        name: parameter.detach().contiguous()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


if __name__ == "__main__":
    rank, world_size, port = (int(arg) for arg in sys.argv[1:4])
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    mode = sys.argv[5] if len(sys.argv) > 5 else None
    if mode in ("fsdp1", "fsdp2"):
        train(rank, world_size, port, mode, out=sys.argv[4])
    else:
        save_file(train(rank, world_size, port, mode), sys.argv[4])
