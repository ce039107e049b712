"""FSDP2 (`fully_shard`, what configs/accelerate/fsdp.json selects) on the CPU with gloo, two ranks forked from a
forkserver: with the KaSA parameters sharded, the auxiliary loss of a training forward equals the value of an
unsharded copy (1e-6 relative), and so do the gradients it produces; so do the chunked causal-LM loss of a sharded
tiny LLaMA and its gradients against the plain loss of the unsharded model. A resumable checkpoint written by the
sharded ranks holds the adapter and the optimizer state whole (equal to an unsharded run's), and a sharded model
resumed from it takes exactly the same next step as the run that wrote it. The ranks rendezvous through a file store
(no port), and every rank has a time limit."""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_loss_worker import loss_inputs, tiny_kasa_llama

TIMEOUT = 600  # seconds per rank: a hung collective fails the test instead of hanging it


def _bert_base() -> torch.nn.Module:
    """A tiny BERT classifier, always the same random weights, no dropout."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def _kasa_bert() -> torch.nn.Module:
    """A tiny BERT with KaSA on query and value, and adapter values far from their init (non-trivial L3 terms)."""
    import kasa

    model = _bert_base()
    kasa.apply_adapters(model, kasa.AdapterConfig(method="kasa", rank=4, target_modules=["query", "value"],
                                                  trainable_modules=["classifier"], beta=1e-2, gamma=1e-1,
                                                  svd_cache_dir=None))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in kasa.adapted_layers(model):
            for param in layer.adapters.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.train()


def _fsdp_inputs(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 50, (2, 7), generator=torch.Generator().manual_seed(seed))


def _grad_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and ("delta_" in n)]


def _shard(model: torch.nn.Module) -> None:
    """FSDP2 as configs/accelerate/fsdp.json sets it up: one unit per BertLayer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)


def _fsdp_worker(rank: int, world_size: int, store: str, results, body, args: tuple) -> None:
    """One rank: join the gloo group, run `body(rank, *args)` and report what it returns (or why it failed)."""
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=TIMEOUT))
        # A sharding failure is a failure of the test, never a skip: the only skip is the checked absence of
        # fully_shard in this torch (in _run_fsdp).
        results.put((rank, "ok", body(rank, *args)))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test instead of dying silently
        results.put((rank, "error", traceback.format_exc()[-3000:]))


def _run_fsdp(tmp_path: Path, body, *args) -> list:
    """Run `body` on 2 FSDP2 ranks (CPU, gloo) and return each rank's result, rank 0 first."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this torch has no FSDP2 fully_shard ({err})")
    # forkserver: the server imports torch, transformers and kasa once, then forks both ranks from it.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "kasa", "torch.distributed.fsdp", "accelerate"])
    results = context.Queue()
    store = tmp_path / f"store-{body.__name__}"
    workers = [context.Process(target=_fsdp_worker, args=(rank, 2, str(store), results, body, args))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    try:
        reports = sorted(results.get(timeout=TIMEOUT) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    for rank, status, payload in reports:
        assert status == "ok", f"rank {rank} failed:\n{payload}"
    return [payload for _, _, payload in reports]


def _aux_loss_body(rank: int) -> dict:
    """A training forward and backward of the sharded model: the aux loss, one KaSA parameter's local shard
    shape, and the full gradients."""
    import kasa

    model = _kasa_bert()
    _shard(model)
    sharded = dict(model.named_parameters())
    name = next(n for n in sharded if n.endswith("delta_u"))
    local_shape = tuple(sharded[name].to_local().shape)
    logits = model(input_ids=_fsdp_inputs()).logits
    aux = kasa.aux_loss(model)
    (logits.square().mean() + aux.total).backward()
    grads = {n: sharded[n].grad.full_tensor().tolist() for n in _grad_names(model)}  # collective: all ranks call it
    return {"total": aux.total.item(), "l2": aux.l2.item(), "l3": aux.l3.item(), "param": name,
            "local_shape": local_shape, "grads": grads}


def test_aux_loss_under_fsdp_equals_the_unsharded_value(tmp_path):
    import kasa

    reference = _kasa_bert()
    logits = reference(input_ids=_fsdp_inputs()).logits
    aux = kasa.aux_loss(reference)
    (logits.square().mean() + aux.total).backward()
    params = dict(reference.named_parameters())
    want = {"total": aux.total.item(), "l2": aux.l2.item(), "l3": aux.l3.item()}

    for rank, got in enumerate(_run_fsdp(tmp_path, _aux_loss_body)):
        full_shape = tuple(params[got["param"]].shape)
        assert got["local_shape"][0] == full_shape[0] // 2, f"rank {rank}: {got['param']} is not sharded"
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (rank, key)
        for name, grad in got["grads"].items():
            torch.testing.assert_close(torch.tensor(grad), params[name].grad, rtol=1e-5, atol=1e-7)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


def _train(model: torch.nn.Module, optimizer, scheduler, seeds: range) -> None:
    import kasa

    for seed in seeds:
        logits = model(input_ids=_fsdp_inputs(seed)).logits
        (logits.square().mean() + kasa.aux_loss(model).total).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _scheduler(optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LinearLR(getattr(optimizer, "optimizer", optimizer), 1.0, 0.1, total_iters=4)


def _checkpoint_body(rank: int, checkpoint: str) -> dict:
    """Train the sharded model 2 steps, write a resumable checkpoint with the loop's own function, then resume a
    fresh sharded model from it; both take a third step. Reports the full trainable tensors of both."""
    from accelerate import Accelerator

    from kasa.training.checkpoint import TrainState, load_resumable_weights, restore_training_state, save_training_state

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    accelerator = Accelerator(cpu=True)  # joins the gloo group the worker started: MULTI_CPU, 2 processes
    assert accelerator.num_processes == 2

    def trainable(model: torch.nn.Module) -> dict[str, list]:
        return {n: p.full_tensor().tolist() for n, p in model.named_parameters() if p.requires_grad}

    model = _kasa_bert()
    _shard(model)
    optimizer = accelerator.prepare_optimizer(_optimizer(model))
    scheduler = _scheduler(optimizer)
    _train(model, optimizer, scheduler, range(2))
    save_training_state(Path(checkpoint), accelerator, model, optimizer, scheduler, TrainState(step=2))

    resumed = _kasa_bert()
    load_resumable_weights(Path(checkpoint), resumed)  # before sharding, as the loop does
    _shard(resumed)
    resumed_optimizer = accelerator.prepare_optimizer(_optimizer(resumed))
    resumed_scheduler = _scheduler(resumed_optimizer)
    state = restore_training_state(Path(checkpoint), accelerator, resumed, resumed_optimizer, resumed_scheduler)
    _train(model, optimizer, scheduler, range(2, 3))
    _train(resumed, resumed_optimizer, resumed_scheduler, range(2, 3))
    return {"step": state.step, "continued": trainable(model), "resumed": trainable(resumed)}


def test_resumable_checkpoint_under_fsdp_is_whole_and_resumes_exactly(tmp_path):
    """FSDP2 shards the adapter and the optimizer state: the checkpoint still holds them whole (equal to an
    unsharded run's), loads without kasa's loop (kasa.load_adapter), and a sharded run resumed from it takes the
    same next step as the run that wrote it."""
    import kasa
    from kasa.training.checkpoint import OPTIMIZER_FILE

    checkpoint = tmp_path / "step-00000002"
    reports = _run_fsdp(tmp_path, _checkpoint_body, str(checkpoint))

    reference = _kasa_bert()
    optimizer = _optimizer(reference)
    scheduler = _scheduler(optimizer)
    _train(reference, optimizer, scheduler, range(2))
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    params = dict(reference.named_parameters())
    trained = [n for n, p in params.items() if p.requires_grad]
    for name in trained:
        torch.testing.assert_close(saved[name], params[name].detach(), rtol=1e-5, atol=1e-6)
    moved = max((saved[n] - _kasa_bert().state_dict()[n]).abs().max().item() for n in trained if "delta_u" in n)
    assert moved > 1e-3, "two steps hardly moved the adapter: the comparison proves nothing"

    whole = torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True)
    assert sorted(whole["state"]) == sorted(trained)  # keyed by parameter name, every parameter present
    for name in trained:
        exp_avg = optimizer.state[params[name]]["exp_avg"]
        torch.testing.assert_close(whole["state"][name]["exp_avg"], exp_avg, rtol=1e-5, atol=1e-7)

    plain = kasa.load_adapter(_bert_base(), checkpoint)
    inputs = _fsdp_inputs(9)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=inputs).logits, reference.eval()(input_ids=inputs).logits,
                                   rtol=1e-5, atol=1e-6)

    for rank, report in enumerate(reports):
        assert report["step"] == 2, rank
        assert sorted(report["resumed"]) == sorted(trained)
        for name in trained:
            assert report["resumed"][name] == report["continued"][name], f"rank {rank}: {name} differs after resume"


def _chunked_loss_body(rank: int, head_unit: bool) -> dict:
    """kasa's chunked causal-LM loss of the FSDP2-sharded model (the head's weight gathered inside its forward); with
    `head_unit` the head is an FSDP unit of its own, whose hooks wrap its input."""
    from torch.distributed.fsdp import fully_shard

    from kasa.tasks.lm_loss import chunkable_head, labelled_token_loss

    model = tiny_kasa_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    if head_unit:
        fully_shard(model.lm_head)
    fully_shard(model)
    assert chunkable_head(model) is model.lm_head  # the sharded model takes the chunked loss
    loss = labelled_token_loss(model, *loss_inputs(0, 0), chunked=True)
    loss.backward()
    grads = {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.item(), "grads": grads}


@pytest.mark.parametrize("head_unit", [False, True])
def test_chunked_lm_loss_under_fsdp_equals_the_plain_unsharded_loss(tmp_path, head_unit):
    from kasa.tasks.lm_loss import labelled_token_loss

    reference = tiny_kasa_llama()
    loss = labelled_token_loss(reference, *loss_inputs(0, 0), chunked=False)
    loss.backward()
    params = dict(reference.named_parameters())
    for rank, got in enumerate(_run_fsdp(tmp_path, _chunked_loss_body, head_unit)):
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-6), rank
        assert set(got["grads"]) == {n for n, p in params.items() if p.grad is not None}
        for name, grad in got["grads"].items():
            torch.testing.assert_close(torch.tensor(grad), params[name].grad, rtol=1e-5, atol=1e-7)
