"""GGUF checkpoints (`model.gguf_file`, e.g. model=smollm2_135m): a tiny random LLaMA written with the `gguf` package
loads as a plain float model that trains, merges and saves like one loaded from safetensors."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
import torch

import kasa
from kasa.config import ModelConfig
from kasa.tasks.models import ModelLoadError, load_causal_lm, load_tokenizer

gguf = pytest.importorskip("gguf")

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
FILE = "tiny.gguf"


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory) -> Path:
    """A folder holding a float32 LLaMA GGUF file with a byte-level BPE vocabulary, as llama.cpp writes one."""
    folder = tmp_path_factory.mktemp("tiny-gguf")
    tokens = ["<s>", "</s>"] + ["Ġ" if c == " " else c for c in string.ascii_lowercase + " .,?"] + ["ab", "abc"]
    writer = gguf.GGUFWriter(str(folder / FILE), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))  # control tokens, then normal ones
    writer.add_token_merges(["a b", "ab c"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    kv_width = HIDDEN * KV_HEADS // HEADS
    shapes = {"token_embd": (len(tokens), HIDDEN)}  # the output head is tied to it (no output.weight)
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_q": (HIDDEN, HIDDEN), f"blk.{i}.attn_k": (kv_width, HIDDEN),
                   f"blk.{i}.attn_v": (kv_width, HIDDEN), f"blk.{i}.attn_output": (HIDDEN, HIDDEN),
                   f"blk.{i}.ffn_gate": (INTERMEDIATE, HIDDEN), f"blk.{i}.ffn_up": (INTERMEDIATE, HIDDEN),
                   f"blk.{i}.ffn_down": (HIDDEN, INTERMEDIATE)}
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.1).astype(np.float32))
    for name in [f"blk.{i}.{norm}" for i in range(LAYERS) for norm in ("attn_norm", "ffn_norm")] + ["output_norm"]:
        writer.add_tensor(f"{name}.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[0, 5, 9, 30, 12, 7]])).logits


def test_a_gguf_base_adapts_merges_and_saves_as_a_plain_model(gguf_folder, tmp_path):
    config = ModelConfig(name="tiny", path=str(gguf_folder), gguf_file=FILE)
    model = load_causal_lm(config)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    kasa.apply_adapters(model, kasa.AdapterConfig(method="kasa", rank=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if param.requires_grad:  # an adapter that moved away from dW = 0
            param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    expected = logits(model.eval())
    kasa.merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")  # kasa-export's merged model
    load_tokenizer(config).save_pretrained(tmp_path / "merged")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("abc ab").input_ids == \
        load_tokenizer(config)("abc ab").input_ids


def test_a_peft_export_of_a_gguf_base_loads_through_its_own_hint(gguf_folder, tmp_path):
    """kasa-export format=peft prints how to load the export; for a GGUF base that line must name the GGUF file
    (the folder holds no config.json), and it must give the adapted model kasa trained."""
    peft = pytest.importorskip("peft")
    import transformers

    from kasa.adapters.peft_format import save_peft_adapter
    from kasa.cli.export import load_hint

    config = ModelConfig(name="tiny", path=str(gguf_folder), gguf_file=FILE)
    model = load_causal_lm(config)
    kasa.apply_adapters(model, kasa.AdapterConfig(method="kasa", rank=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    expected = logits(model.eval())
    save_peft_adapter(model, tmp_path / "peft", str(gguf_folder))
    hint = load_hint("peft", config, type(model).__name__, tmp_path / "peft", None)
    assert f"gguf_file={FILE!r}" in hint
    loaded = eval(hint.split("  #")[0], {"transformers": transformers, "peft": peft}).eval()  # the printed line
    torch.testing.assert_close(logits(loaded), expected, atol=2e-5, rtol=0)


def test_loading_draws_no_bar_when_transformers_draws_none(gguf_folder, capfd):
    import transformers

    transformers.utils.logging.disable_progress_bar()  # what every kasa command does (quiet_libraries)
    try:
        load_causal_lm(ModelConfig(path=str(gguf_folder), gguf_file=FILE, dtype="float32"))
    finally:
        transformers.utils.logging.enable_progress_bar()
    assert "GGUF" not in capfd.readouterr().err


def test_a_missing_folder_or_gguf_file_is_said_plainly(gguf_folder, tmp_path):
    """transformers reports both as a bad Hub id or a missing file on huggingface.co: a local path deserves better."""
    with pytest.raises(ModelLoadError, match=r"model.path='.*nowhere' is not a folder"):
        load_tokenizer(ModelConfig(name="tiny", path=str(tmp_path / "nowhere")))
    with pytest.raises(ModelLoadError, match=rf"gguf_file='other.gguf' is not in .*: its GGUF files are \['{FILE}'\]"):
        load_causal_lm(ModelConfig(name="tiny", path=str(gguf_folder), gguf_file="other.gguf"))
