"""Builds a tiny random-weight DeepSeek-V3 checkpoint with a locally trained BPE tokenizer.

The result is a real Hugging Face checkpoint directory (config.json, safetensors
weights, tokenizer.json) of the real `DeepseekV3ForCausalLM` architecture — MLA
attention, routed + shared experts — just small enough to build in about a second
and generate on a CPU. It is deterministic for a given seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# A small corpus: the tokenizer only needs to cover bytes and a few merges.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Inference servers batch requests to keep the accelerator busy.",
    "seekgate checks every key before a request reaches Triton.",
    "DeepSeek is a mixture-of-experts language model with latent attention.",
    "Banks, hospitals and factories keep their data inside the building.",
    "Hello world! 0123456789 +-*/=()[]{}<>,.;:?!'\"",
] * 20

SPECIAL_TOKENS = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>"]

# DeepSeek-V3's chat template (tokenizer_config.json of deepseek-ai/DeepSeek-V3), tool calls left out:
# system prompts first, then <|User|> / <|Assistant|> turns, each assistant turn closed by EOS. The
# role markers are plain text to this tokenizer (new special tokens would change the vocabulary and so
# every existing output of the seeded checkpoint).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|User|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|Assistant|>' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|>' }}{% endif %}"
)


def build_tokenizer(out: Path, vocab_size: int = 512) -> None:
    """Trains a byte-level BPE tokenizer on a fixed corpus and saves it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
        padding_side="left",
        model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def build_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    """Writes the tiny checkpoint to `out` (created if missing) and returns it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    config = DeepseekV3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,        # layer 0 dense, layer 1 MoE: both code paths exist
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config)
    # Random init gives near-uniform logits; a larger spread makes greedy decoding
    # decisive, so batched and one-at-a-time runs agree despite float rounding.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    model.generation_config.save_pretrained(str(out))
    (out / "seekgate-tiny.json").write_text(json.dumps({"seed": seed, "kind": "tiny-random"}))
    return out


def ensure_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    """Builds the checkpoint only when `out` does not already hold one (with a chat template: older
    builds had none, and the build is deterministic, so rebuilding changes nothing else)."""
    if (out / "config.json").exists() and (out / "tokenizer.json").exists() and _has_chat_template(out):
        return out
    return build_tiny_checkpoint(out, seed)


def _has_chat_template(out: Path) -> bool:
    if (out / "chat_template.jinja").exists():   # where newer transformers save it
        return True
    try:
        return bool(json.loads((out / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False
