"""What the generation tasks (E2E, instruction following, commonsense) share: a causal LM, prompt/response
examples with the loss on the response only, padded or packed batches, the shifted cross-entropy, and batched
generation spread over the processes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from transformers import PreTrainedTokenizerBase

from kasa.config import RunConfig, launch_rank
from kasa.data.errors import DataError
from kasa.data.prompts import IGNORE_INDEX, prompt_response_features
from kasa.tasks.batching import FLASH_ATTENTION, PackedCollator, block_causal_mask, pack_examples, packed_row
from kasa.tasks.lm_loss import labelled_token_loss, loss_positions
from kasa.tasks.models import inner_model, load_causal_lm, load_tokenizer

if TYPE_CHECKING:
    from datasets import Dataset


class PadCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100) to the longest row of the batch, and adds
    where the loss lies (kasa.tasks.lm_loss.loss_positions)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        batch = {
            key: torch.tensor([list(row[key]) + [value] * (length - len(row[key])) for row in rows])
            for key, value in self.pad.items()
        }
        return {**batch, **loss_positions(batch["labels"])}


def encode_prompt_response(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str,
                           max_length: int, train_on_inputs: bool = False) -> dict[str, list[int]]:
    """input_ids of prompt + response + EOS, labels masking the prompt (the loss on the response only) unless
    `train_on_inputs`."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_response_features(prompt_ids, response_ids, max_length, train_on_inputs)


def training_dataset(rows: list[dict[str, list[int]]], max_length: int, packing: bool = False) -> Dataset:
    """The encoded rows that keep at least one labelled token, packed into rows of max_length when `packing`. A
    prompt of max_length tokens or more leaves none: such a row carries no loss (and a batch of only such rows
    would make the mean loss NaN), so it is dropped."""
    kept = [row for row in rows if any(label != IGNORE_INDEX for label in row["labels"])]
    if not kept:
        raise DataError(f"no training example has a response token within trainer.max_length={max_length} "
                        f"(of {len(rows)} examples): raise trainer.max_length")
    if len(kept) < len(rows) and launch_rank()[0] == 0:
        print(f"warning: {len(rows) - len(kept)} of {len(rows)} training examples have no response token within "
              f"trainer.max_length={max_length} (the prompt fills it) and are left out: raise trainer.max_length "
              "to train on them", file=sys.stderr, flush=True)
    if packing:
        groups = pack_examples([len(row["input_ids"]) for row in kept], max_length)
        kept = [packed_row([kept[i] for i in group]) for group in groups]
    from datasets import Dataset  # here, not at the top: what builds no data set (the GPU check) needs no datasets

    return Dataset.from_list(kept)


class CausalLMTask:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.metric = cfg.task.metric
        settings = cfg.task.generation
        if settings.num_return_sequences < 1:
            raise ValueError("task.generation.num_return_sequences must be at least 1")
        if not settings.do_sample and settings.num_return_sequences > settings.num_beams:
            raise ValueError(
                f"task.generation.num_return_sequences={settings.num_return_sequences} needs num_beams >= that "
                f"(got {settings.num_beams}) or do_sample=true: beam search returns its best beams"
            )

    def load_model(self) -> tuple[PreTrainedTokenizerBase, nn.Module]:
        tokenizer = load_tokenizer(self.cfg.model)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {self.cfg.model.path or self.cfg.model.name} has no eos_token: "
                             "a generation task needs one to end responses")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = load_causal_lm(self.cfg.model)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return tokenizer, model

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> PadCollator | PackedCollator:
        if self.cfg.trainer.packing:
            return PackedCollator(tokenizer.pad_token_id,
                                  one_row=self.cfg.model.attn_implementation in FLASH_ATTENTION)
        return PadCollator(tokenizer.pad_token_id)

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's inputs for a padded batch, or for a packed one (it has position_ids): the attention kept
        within each example as the attention implementation needs it (see kasa.tasks.batching)."""
        if "position_ids" not in batch:
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        implementation = self.cfg.model.attn_implementation
        if implementation not in FLASH_ATTENTION:  # flash: one row, split where the positions restart
            additive = torch.float32 if implementation == "eager" else None
            inputs["attention_mask"] = block_causal_mask(batch["position_ids"], additive)
        return inputs

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean token cross-entropy (with trainer.label_smoothing) of the labelled tokens.

        The language-model head runs only at the columns that predict a labelled token in some row (prompts
        carry no loss: for a 128K-word vocabulary the logits of every prompt position would cost more memory than
        the rest of the step), and for most models a chunk of tokens at a time (kasa.tasks.lm_loss)."""
        return labelled_token_loss(model, self.model_inputs(batch), batch, self.cfg.trainer.label_smoothing,
                                   chunked=not self.cfg.trainer.compile)

    def loss_items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["loss_tokens"].numel()  # its size is on the host, wherever the tensor is

    def generate(self, model: nn.Module, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                 prompts: Sequence[str], add_special_tokens: bool = True) -> list[list[str]]:
        """Responses to `prompts` (num_return_sequences per prompt, prompt order), each process generating a
        share; every process gets the full list back."""
        settings = self.cfg.task.generation
        model = inner_model(accelerator, model)
        was_training = model.training
        model.eval()
        # Longest prompts first (a batch that does not fit fails at once), batches of similar lengths (little
        # padding); every process gets a share of each length. The results are put back in prompt order below.
        lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]
        by_length = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        indices = by_length[accelerator.process_index::accelerator.num_processes]
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # generation continues from the last position of every row
        # Stop at the tokenizer's EOS and at any the model's generation config adds (LLaMA-3's <|eot_id|>).
        stop = [tokenizer.eos_token_id]
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop += [t for t in (configured if isinstance(configured, list) else [configured]) if t is not None]
        options = dict(
            max_new_tokens=settings.max_new_tokens,
            num_beams=settings.num_beams,
            length_penalty=settings.length_penalty,
            no_repeat_ngram_size=settings.no_repeat_ngram_size,
            do_sample=settings.do_sample,
            num_return_sequences=settings.num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=list(dict.fromkeys(stop)),
        )
        if settings.do_sample:
            options |= {"temperature": settings.temperature, "top_p": settings.top_p}
        else:  # the model's own sampling defaults (an instruct model's temperature) would only raise warnings
            options |= {"temperature": None, "top_p": None, "top_k": None}
        results: list[tuple[int, list[str]]] = []
        try:
            for start in range(0, len(indices), settings.batch_size):
                chunk = indices[start:start + settings.batch_size]
                inputs = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                   add_special_tokens=add_special_tokens).to(model.device)
                with torch.no_grad():
                    output = model.generate(**inputs, **options)
                texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                per = settings.num_return_sequences
                results += [(i, [t.strip() for t in texts[j * per:(j + 1) * per]]) for j, i in enumerate(chunk)]
        finally:
            tokenizer.padding_side = side
            model.train(was_training)
        gathered = gather_object(results) if accelerator.num_processes > 1 else results
        return [texts for _, texts in sorted(gathered, key=lambda item: item[0])]


def output_file(output_dir: Path | None, name: str) -> Path | None:
    if output_dir is None:
        return None
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return Path(output_dir) / name
