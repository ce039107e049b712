"""A rank of the chunked causal-LM loss test under DeepSpeed ZeRO-3 (tests/test_distributed.py): two AdamW steps of
a tiny LLaMA with KaSA, each rank on its own batch; rank 0 writes its losses and the gathered adapter as JSON.

    accelerate launch --config_file configs/accelerate/deepspeed_zero3.json --num_processes 2 \
        tests/lm_loss_worker.py OUT.json"""

from __future__ import annotations

import json
import os
import sys

import torch

STEPS = 2


def tiny_kasa_llama() -> torch.nn.Module:
    """A tiny LLaMA with KaSA on q_proj and v_proj, untied embeddings and a frozen head."""
    import transformers

    import kasa

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    kasa.apply_adapters(model, kasa.AdapterConfig(method="kasa", rank=4, target_modules=["q_proj", "v_proj"],
                                                  svd_cache_dir=None))
    return model.train()


def loss_inputs(step: int, rank: int) -> tuple[dict, dict]:
    """(model inputs, loss positions) of rank `rank`'s batch at `step`: prompts of 4 and 6 tokens carry no loss."""
    from kasa.data.prompts import IGNORE_INDEX
    from kasa.tasks.lm_loss import loss_positions

    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(100 * step + rank))
    labels = ids.clone()
    labels[0, :4], labels[1, :6] = IGNORE_INDEX, IGNORE_INDEX
    return {"input_ids": ids}, loss_positions(labels)


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def main(out: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from kasa.tasks.lm_loss import chunkable_head, labelled_token_loss
    from kasa.training.loop import import_deepspeed_without_mlflow

    import_deepspeed_without_mlflow()  # as kasa's training loop does
    import deepspeed

    # DeepSpeed's CPU accelerator needs gloo named, as kasa's training loop does (else each rank is a world of one).
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    assert accelerator.state.deepspeed_plugin is not None, "not launched with DeepSpeed"
    model = tiny_kasa_llama()
    sizes = torch.utils.data.DataLoader(range(4), batch_size=2)  # only tells DeepSpeed the batch size per rank
    model, adamw, _ = accelerator.prepare(model, optimizer(model), sizes)
    head = chunkable_head(model)
    assert head is not None, "the ZeRO-3 model does not take the chunked loss"
    assert head.weight.numel() == 0, "the head's weight is not partitioned: this is not ZeRO-3"
    losses = []
    for step in range(STEPS):
        loss = labelled_token_loss(model, *loss_inputs(step, accelerator.process_index), chunked=True)
        accelerator.backward(loss)
        adamw.step()
        adamw.zero_grad()
        losses.append(loss.item())
    adapter = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(adapter.values())):  # ZeRO-3 holds a shard of each on every rank
        values = {n: p.detach().tolist() for n, p in adapter.items()}
    if accelerator.is_main_process:
        with open(out, "w") as file:
            json.dump({"losses": losses, "adapter": values}, file)
    # Leave the process group before exiting: a rank whose gloo threads are still up at interpreter exit can abort
    # ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # As kasa-train's processes do (kasa/cli/train.py): a gloo thread still joinable at interpreter teardown aborted
    # a rank now and then even after destroy_process_group (SIGABRT; seen once in this test, at 19e4d05)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
