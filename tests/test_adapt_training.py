"""Training transformers models with DoTA adapters: exactness at initialisation, what
trains, the two strategies, merging and unwrapping, Trainer, mixed precision, DDP and
gradient checkpointing. Every model is a tiny one built from a config (no downloads)."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from conftest import TINY_BERT, TINY_LLAMA  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

import mpo.adapt  # noqa: E402
import mpo.adapt.delta  # noqa: E402
from mpo import MPOError  # noqa: E402
from mpo.adapt import (  # noqa: E402
    PAPER_TARGETS,
    DoTALinear,
    dota_layers,
    merge_and_unload,
    unwrap,
    wrap,
)

VOCAB = TINY_LLAMA["vocab_size"]
INITS = ["dota", "random"]
STRATEGIES = ["auto", "dense", "factored"]

# transformers 5 renamed gradient checkpointing to activation checkpointing; the old
# names, which transformers 4 needs, still work and warn.
OLD_CHECKPOINTING_NAMES = pytest.mark.filterwarnings(
    r"ignore:`\w*gradient_checkpointing\w*` is deprecated:FutureWarning"
)


def tiny_llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))


def tiny_gpt2() -> nn.Module:
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, bos_token_id=0)
    config.eos_token_id = 0
    return GPT2LMHeadModel(config)


def tiny_bert_config() -> BertConfig:
    return BertConfig(**TINY_BERT)


# name: (builder, target_modules); the Bert entries cover both ways of naming targets.
ARCHITECTURES = {
    "llama": (tiny_llama, None),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "bert-mlm": (lambda: BertForMaskedLM(tiny_bert_config()), "all-linear"),
    "bert": (lambda: BertModel(tiny_bert_config()), ["query", "key", "value"]),
}
LANGUAGE_MODELS = ["llama", "gpt2", "bert-mlm"]
CAUSAL_LMS = ["llama", "gpt2"]


def base_model(architecture: str) -> nn.Module:
    """The tiny model, seeded and in eval mode (no dropout), without adapters."""
    torch.manual_seed(0)
    return ARCHITECTURES[architecture][0]().eval()


def wrapped(model: nn.Module, architecture: str = "llama", **overrides) -> nn.Module:
    targets = ARCHITECTURES[architecture][1]
    if targets is not None:
        overrides.setdefault("target_modules", targets)
    return wrap(model, rank=4, num_cores=3, quiet=True, **overrides)


def adapted_model(architecture: str = "llama", **overrides) -> nn.Module:
    return wrapped(base_model(architecture), architecture, **overrides)


def token_batch(rows: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 8), generator=torch.Generator().manual_seed(seed))


def first_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a language model, the last hidden state of a bare encoder."""
    return model(input_ids=ids)[0]


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def set_strategy(model: nn.Module, strategy: str) -> None:
    for _, layer in dota_layers(model):
        layer.strategy = strategy


def named_cores(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "dota_cores" in name}


def snapshot_cores(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in named_cores(model).items()}


def perturb_cores(model: nn.Module, scale: float = 0.1, seed: int = 2) -> None:
    """Move the cores away from initialisation so that the update is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for core in named_cores(model).values():
            noise = torch.randn(core.shape, generator=generator, dtype=torch.float32)
            core.add_(scale * noise.to(core.dtype))


def core_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in named_cores(model).items()}


def assert_same_tensors(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name, **tolerance)


# -- 1. exact at initialisation -------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_wrapping_leaves_the_outputs_bit_identical(architecture, init, strategy):
    model, ids = base_model(architecture), token_batch()
    expected = first_output(model, ids)
    wrapped(model, architecture, init=init)
    set_strategy(model, strategy)
    assert dota_layers(model)
    assert torch.equal(first_output(model, ids), expected)


# -- 2. only the cores train ----------------------------------------------------------


@pytest.mark.parametrize("architecture", LANGUAGE_MODELS)
def test_only_cores_require_gradients(architecture):
    model = adapted_model(architecture)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(named_cores(model))
    assert all(not layer.base_layer.weight.requires_grad for _, layer in dota_layers(model))


@pytest.mark.parametrize("architecture", LANGUAGE_MODELS)
def test_backward_reaches_every_core_and_nothing_else(architecture):
    model = adapted_model(architecture)
    lm_loss(model, token_batch()).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(named_cores(model))
    assert all(p.grad.abs().sum() > 0 for p in named_cores(model).values())


@pytest.mark.parametrize("architecture", LANGUAGE_MODELS)
def test_an_optimizer_step_changes_the_cores_only(architecture):
    model = adapted_model(architecture)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lm_loss(model, token_batch()).backward()
    optimizer.step()
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(after[name], before[name])}
    assert changed == set(named_cores(model))
    assert any("dota_init" in name for name in before)  # the frozen T0 stayed put


# -- 3. training lowers the loss -------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("architecture", LANGUAGE_MODELS)
def test_a_few_adamw_steps_lower_the_loss(architecture, init):
    model, ids = adapted_model(architecture, init=init), token_batch()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    losses = []
    for _ in range(5):
        loss = lm_loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses


# -- 4. dense and factored agree -------------------------------------------------------


def outputs_and_core_gradients(model: nn.Module, strategy: str, ids: torch.Tensor) -> tuple:
    set_strategy(model, strategy)
    model.zero_grad()
    output = model(input_ids=ids, labels=ids)
    output.loss.backward()
    return output.logits.detach(), core_gradients(model)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("architecture", CAUSAL_LMS)
def test_dense_and_factored_strategies_give_the_same_outputs(architecture, init):
    model, ids = adapted_model(architecture, init=init), token_batch()
    perturb_cores(model)
    dense, _ = outputs_and_core_gradients(model, "dense", ids)
    factored, _ = outputs_and_core_gradients(model, "factored", ids)
    torch.testing.assert_close(dense, factored, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("architecture", CAUSAL_LMS)
def test_dense_and_factored_strategies_give_the_same_core_gradients(architecture, init):
    model, ids = adapted_model(architecture, init=init), token_batch()
    perturb_cores(model)
    _, dense = outputs_and_core_gradients(model, "dense", ids)
    _, factored = outputs_and_core_gradients(model, "factored", ids)
    assert_same_tensors(dense, factored, rtol=1e-4, atol=1e-6)


# -- 5. merge, save, unwrap ------------------------------------------------------------


def trained_adapter(architecture: str) -> nn.Module:
    model = adapted_model(architecture)
    perturb_cores(model)
    return model


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_merge_and_unload_keeps_the_adapted_outputs(architecture):
    model, ids = trained_adapter(architecture), token_batch()
    with torch.no_grad():
        base = first_output(base_model(architecture), ids)
        adapted = first_output(model, ids)
        merged = first_output(merge_and_unload(model), ids)
    assert not torch.allclose(adapted, base)  # the update is not zero
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_with_a_dtype_casts_the_whole_model():
    model, ids = trained_adapter("llama"), token_batch()
    with torch.no_grad():
        adapted = first_output(model, ids)
        merged = merge_and_unload(model, dtype="bfloat16")
        assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
        torch.testing.assert_close(first_output(merged, ids).float(), adapted, rtol=0.05, atol=0.05)
    with pytest.raises(MPOError, match="dtype must be one of float32, bfloat16"):
        merge_and_unload(trained_adapter("llama"), dtype="int8")


@pytest.mark.parametrize("architecture", CAUSAL_LMS)
def test_merge_and_unload_leaves_plain_transformers_layers(architecture):
    model = merge_and_unload(trained_adapter(architecture))
    targets = ARCHITECTURES[architecture][1] or PAPER_TARGETS
    layers = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    assert layers
    assert all(type(m) in (nn.Linear, Conv1D) for m in layers)
    assert not dota_layers(model)
    assert not any("dota" in key for key in model.state_dict())
    assert not hasattr(model, "dota_config")


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_merged_model_round_trips_through_save_pretrained(architecture, tmp_path):
    model, ids = merge_and_unload(trained_adapter(architecture)), token_batch()
    model.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if architecture in CAUSAL_LMS else type(model)
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(first_output(loaded, ids), first_output(model, ids))


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_unwrap_gives_back_the_base_model_bit_for_bit(architecture):
    model, ids = base_model(architecture), token_batch()
    original = copy.deepcopy(model)
    wrapped(model, architecture)
    perturb_cores(model)
    unwrap(model)
    expected, actual = original.state_dict(), model.state_dict()
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    with torch.no_grad():
        assert torch.equal(first_output(model, ids), first_output(original, ids))


# -- 6. transformers Trainer -------------------------------------------------------------


def tiny_dataset(size: int = 4) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": ids, "labels": ids.clone()} for ids in token_batch(size, seed=3)]


def train_with_trainer(
    model: nn.Module, output_dir: Path, callbacks: list | None = None, **arguments
) -> Trainer:
    arguments = {"save_strategy": "no", **arguments}
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        gradient_checkpointing=True,
        **arguments,
    )
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(), callbacks=callbacks)
    trainer.train()
    return trainer


def test_save_adapter_callback_writes_the_adapter_into_each_checkpoint(tmp_path):
    from mpo.adapt.trainer import SaveAdapterCallback

    model, ids = adapted_model("llama"), token_batch()
    train_with_trainer(
        model, tmp_path, callbacks=[SaveAdapterCallback()], save_strategy="steps", save_steps=2
    )
    with torch.no_grad():
        trained = first_output(model, ids)
        final = first_output(mpo.adapt.load_adapter(base_model("llama"), tmp_path / "adapter"), ids)
        halfway = first_output(
            mpo.adapt.load_adapter(base_model("llama"), tmp_path / "checkpoint-2" / "adapter"), ids
        )
    assert torch.equal(final, trained)
    assert (tmp_path / "checkpoint-3" / "adapter" / "adapter_model.safetensors").is_file()
    assert not torch.equal(halfway, trained)  # the adapter as it was at step 2


def test_save_adapter_callback_warns_where_the_checkpoint_is_elsewhere(tmp_path):
    # Trainer.hyperparameter_search saves checkpoints in run folders below output_dir
    from transformers import TrainerControl, TrainerState

    from mpo.adapt.trainer import SaveAdapterCallback

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState(global_step=2)
    with pytest.warns(UserWarning, match="no checkpoint folder .*checkpoint-2"):
        SaveAdapterCallback().on_save(args, state, TrainerControl(), model=adapted_model("llama"))
    assert not any(tmp_path.iterdir())


def logged_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_every_core_changed(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = snapshot_cores(model)
    assert all(not torch.equal(after[name], before[name]) for name in before)
    assert all(torch.isfinite(core).all() for core in after.values())


@OLD_CHECKPOINTING_NAMES
def test_trainer_trains_the_cores_with_gradient_checkpointing(tmp_path):
    model = adapted_model()
    before = snapshot_cores(model)
    trainer = train_with_trainer(model, tmp_path)
    losses = logged_losses(trainer)
    assert len(losses) == 3
    assert all(torch.isfinite(torch.tensor(losses)))
    assert model.is_gradient_checkpointing
    assert_every_core_changed(model, before)


@OLD_CHECKPOINTING_NAMES
@pytest.mark.parametrize("strategy", ["dense", "factored"])
def test_trainer_trains_the_cores_in_bf16_mixed_precision(tmp_path, strategy):
    model = adapted_model()
    set_strategy(model, strategy)
    before = snapshot_cores(model)
    trainer = train_with_trainer(model, tmp_path, bf16=True)
    assert all(torch.isfinite(torch.tensor(logged_losses(trainer))))
    assert_every_core_changed(model, before)


# -- 7. mixed precision by hand ---------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_model_with_float32_cores_trains_under_autocast(strategy):
    model = wrapped(base_model("llama").to(torch.bfloat16))
    set_strategy(model, strategy)
    assert {core.dtype for core in named_cores(model).values()} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(model, token_batch())
    loss.backward()
    assert torch.isfinite(loss)
    for name, core in named_cores(model).items():
        assert core.grad.dtype == torch.float32, name
        assert torch.isfinite(core.grad).all(), name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_dense_backward_inside_autocast_gives_the_gradients_of_one_outside():
    """The dense strategy's own backward turns autocast off (torch advises against
    backward under autocast; the factored strategy is plain autograd and follows it)."""
    torch.manual_seed(0)
    layer = DoTALinear(nn.Linear(32, 32), rank=4, shape=((2, 4, 4), (2, 4, 4)))
    layer.strategy = "dense"
    with torch.no_grad():
        for core in layer.cores():
            core.add_(0.05 * torch.randn_like(core))
    x = torch.randn(2, 8, 32)
    gradients = []
    for backward_inside in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(x).float().square().mean()
            if backward_inside:
                gradients.append(torch.autograd.grad(loss, layer.cores()))
        if not backward_inside:
            gradients.append(torch.autograd.grad(loss, layer.cores()))
    for inside, outside in zip(*gradients, strict=True):
        assert torch.equal(inside, outside)


def test_float64_input_is_left_alone_by_autocast_as_the_base_layer_does():
    base = nn.Linear(32, 32).double()
    layer = DoTALinear(base, rank=4, shape=((2, 4, 4), (2, 4, 4)))
    layer.strategy = "dense"
    x = torch.randn(3, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["dense", "factored", "workspace"])
def test_float32_layer_runs_under_autocast(strategy, dtype, monkeypatch):
    torch.manual_seed(0)
    layer = DoTALinear(nn.Linear(32, 32), rank=4, shape=((2, 4, 4), (2, 4, 4)))
    if strategy == "workspace":  # the dense strategy through the CPU workspace
        monkeypatch.setattr(mpo.adapt.delta, "_WORKSPACE_MIN_BYTES", 0)
        strategy = "dense"
    layer.strategy = strategy
    with torch.no_grad():
        for core in layer.cores():
            core.add_(0.1 * torch.randn_like(core))
    x = torch.randn(2, 8, 32)
    y_ref = layer(x)
    y_ref.square().mean().backward()
    grads_ref = [core.grad.clone() for core in layer.cores()]
    layer.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    y.float().square().mean().backward()
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    for core, reference in zip(layer.cores(), grads_ref, strict=True):
        assert core.grad.dtype == torch.float32
        torch.testing.assert_close(core.grad, reference, rtol=2e-2, atol=2e-3)


# -- 8. DistributedDataParallel ---------------------------------------------------------

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_environment() -> dict[str, str]:
    repository = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": path}
    # gloo otherwise picks the interface the host name resolves to
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:
        environment["GLOO_SOCKET_IFNAME"] = loopback[0]
    return environment


def load_worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def two_ranks(outputs: list, mode: str | None = None):
    """Run ddp_worker.py as ranks 0 and 1 (``OUT`` = ``outputs[rank]``, then ``mode``) while
    the block runs (a single-process reference, say); on leaving, wait for both and check
    that they exited cleanly, showing their output if not."""
    port, environment = free_loopback_port(), worker_environment()
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", str(port), str(output)]
            + ([mode] if mode else []),
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, output in enumerate(outputs)
    ]
    try:
        yield
        logs = [process.communicate(timeout=300)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0, 0], "\n".join(logs)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_ddp_on_two_processes_trains_like_one_process_on_the_whole_batch(quantize, tmp_path):
    if quantize:
        pytest.importorskip("bitsandbytes")
    outputs = [tmp_path / f"rank{rank}.safetensors" for rank in range(2)]
    with two_ranks(outputs, quantize):
        single = load_worker().train(rank=0, world_size=1, port=0, quantize=quantize)
    rank0, rank1 = (load_file(output) for output in outputs)
    assert_same_tensors(rank1, rank0, rtol=0, atol=0)
    assert_same_tensors(rank0, single, rtol=1e-5, atol=1e-6)
    initial = snapshot_cores(adapted_model())
    assert single.keys() == initial.keys()
    assert all(not torch.allclose(single[name], initial[name]) for name in initial)


def test_fsdp2_trains_saves_and_merges_like_one_process(tmp_path):
    # fully_shard keeps the cores as DTensor shards outside forward and backward:
    # save_adapter gathers them on every rank (rank 0 writes), merging cuts Delta to the
    # weight's shard
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")
    worker = load_worker()
    with two_ranks([tmp_path, tmp_path], "fsdp2"):
        single = adapted_like_the_worker(worker)
    batch = worker.global_batch()
    with torch.no_grad():
        expected = single(input_ids=batch).logits
        loaded = mpo.adapt.load_adapter(worker.base_model(), tmp_path / "adapter")
        torch.testing.assert_close(loaded(input_ids=batch).logits, expected, rtol=1e-4, atol=1e-5)
        merged = merge_and_unload(single)(input_ids=batch).logits
    for rank in range(2):
        logits = load_file(tmp_path / f"logits-{rank}.safetensors")["logits"]
        torch.testing.assert_close(logits, merged, rtol=1e-4, atol=1e-5)


def test_fsdp1_saves_inside_summon_full_params_like_one_process(tmp_path):
    # FSDP1 keeps the cores as flat shards under _fsdp_wrapped_module names; every rank
    # gathers them in summon_full_params, rank 0 writes, under the plain model's names
    worker = load_worker()
    with two_ranks([tmp_path, tmp_path], "fsdp1"):
        single = adapted_like_the_worker(worker)
    batch = worker.global_batch()
    with torch.no_grad():
        loaded = mpo.adapt.load_adapter(worker.base_model(), tmp_path / "adapter")
        torch.testing.assert_close(
            loaded(input_ids=batch).logits, single(input_ids=batch).logits, rtol=1e-4, atol=1e-5
        )


def adapted_like_the_worker(worker):
    """The worker's model trained in this process on the whole batch."""
    trained = worker.train(rank=0, world_size=1, port=0)
    model = mpo.adapt.wrap(worker.base_model(), rank=4, num_cores=3, quiet=True)
    assert not model.load_state_dict(trained, strict=False).unexpected_keys
    return model


# -- 9. gradient checkpointing ---------------------------------------------------------


@OLD_CHECKPOINTING_NAMES
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradient_checkpointing_gives_the_same_core_gradients(strategy, use_reentrant):
    model, ids = adapted_model().train(), token_batch()
    perturb_cores(model)
    set_strategy(model, strategy)
    lm_loss(model, ids).backward()
    expected = core_gradients(model)
    model.zero_grad()
    model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    assert model.is_gradient_checkpointing
    lm_loss(model, ids).backward()
    assert_same_tensors(core_gradients(model), expected, rtol=1e-5, atol=1e-8)


# -- 9. torch.compile --------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["dense", "factored"])
def test_torch_compile_traces_the_adapted_model(strategy):
    # aot_eager: dynamo's tracing and autograd's graph, without inductor's compile time
    model = adapted_model()
    perturb_cores(model)
    set_strategy(model, strategy)
    ids = token_batch()
    expected = lm_loss(model, ids)
    expected.backward()
    expected_grads = core_gradients(model)
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    loss = lm_loss(compiled, ids)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert_same_tensors(core_gradients(model), expected_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("workspace", [False, True])
@pytest.mark.parametrize("strategy", ["dense", "factored", "auto"])
def test_a_layer_compiles_into_one_graph(strategy, workspace, monkeypatch):
    # fullgraph: no graph break, so a compiled model keeps the layer inside its graphs;
    # a layer large enough for the CPU workspace (any layer, here) compiles without it
    if workspace:
        monkeypatch.setattr(mpo.adapt.delta, "_WORKSPACE_MIN_BYTES", 0)
    torch.manual_seed(0)
    layer = DoTALinear(nn.Linear(64, 48), rank=4, shape=((4, 3, 4), (4, 4, 4)))
    layer.strategy = strategy
    perturb_cores(layer, scale=0.05)
    x = torch.randn(5, 64, requires_grad=True)
    results = []
    for module in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        y = module(x)
        results.append((y, *torch.autograd.grad(y.square().sum(), [x, *layer.cores()])))
    for got, expected in zip(*reversed(results), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_wrapping_adds_no_graph_break_to_a_compiled_model():
    ids = token_batch()
    breaks = []
    for model in (base_model("llama"), adapted_model()):
        explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
        breaks.append(explanation.graph_break_count)
        torch._dynamo.reset()
    assert breaks[1] == breaks[0]
