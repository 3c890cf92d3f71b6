"""Tiny random sparse decoders of each supported family, and a tokenizer that works offline.

Tests and the CPU demo need every family's code path (OLMoE, Qwen2-MoE, Qwen3-MoE,
Mixtral) without a hub download, so this module builds them from a config alone.

API (used by the instruction task and the tests):

- ``FAMILIES``: the family names, ``("olmoe", "qwen2_moe", "qwen3_moe", "mixtral")``.
- ``tiny_config(family, *, vocab_size=TINY_VOCAB, **overrides)`` -> a transformers config with
  hidden 64, 2 layers, 8 experts, top-2 (expert width 32; Qwen2-MoE: shared expert width 64).
  The routing choices follow the real checkpoints: OLMoE and Qwen2-MoE do not renormalise the
  top-k weights, Qwen3-MoE does, Mixtral always does. Eager attention, so FLOP counts work.
- ``tiny_model(family, seed=0, **overrides)`` -> ``*ForCausalLM`` in float32, eval mode, its
  weights drawn from ``torch.manual_seed(seed)`` inside a forked RNG (the global RNG is left
  untouched); pad/bos/eos ids match :func:`tiny_tokenizer`.
- ``tiny_tokenizer(corpus=None, vocab_size=TINY_VOCAB)`` -> ``PreTrainedTokenizerFast``:
  byte-level BPE, so ANY text encodes (no unknown token). With ``corpus=None`` it has no
  merges (one token per UTF-8 byte, fully deterministic, no training); with a list of
  strings it learns up to ``vocab_size`` merges from them (deterministic for a given corpus).
  Special tokens: ``<pad>`` (id 0), ``<s>`` (bos, id 1), ``</s>`` (eos, id 2); nothing is
  added automatically around a text. ``padding_side`` is ``"right"``; set
  ``tok.padding_side = "left"`` for generation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ubsmoe.errors import ConfigError

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral")
TINY_VOCAB = 512
MAX_POSITIONS = 4096  # the tiny models' max_position_embeddings and the tokenizer's model_max_length
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2


def tiny_config(family: str, *, vocab_size: int = TINY_VOCAB, **overrides):
    """A small random config of ``family`` (see the module docstring for the shapes)."""
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    if family == "olmoe":
        params = dict(common, intermediate_size=32, num_experts=8, norm_topk_prob=False)
        cls = OlmoeConfig
    elif family == "qwen2_moe":
        params = dict(
            common, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            num_experts=8, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        )  # fmt: skip
        cls = Qwen2MoeConfig
    elif family == "qwen3_moe":
        params = dict(
            common, intermediate_size=128, moe_intermediate_size=32, num_experts=8, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[], head_dim=16,
        )  # fmt: skip
        cls = Qwen3MoeConfig
    elif family == "mixtral":
        params = dict(common, intermediate_size=32, num_local_experts=8, head_dim=16)
        cls = MixtralConfig
    else:
        raise ConfigError("model.family", family, f"one of {list(FAMILIES)}")
    params.update(overrides)
    return cls(**params)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised ``*ForCausalLM`` of ``family`` (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)
    return model.eval()


def tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = TINY_VOCAB):
    """A byte-level BPE tokenizer built in-process (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(byte_alphabet):
        raise ConfigError(
            "tokenizer.vocab_size", vocab_size, f"at least {len(SPECIAL_TOKENS) + len(byte_alphabet)} (specials + bytes)"
        )
    if corpus is None:
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for ch in sorted(byte_alphabet):
            vocab[ch] = len(vocab)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=sorted(byte_alphabet),
            show_progress=False,
        )  # fmt: skip
        backend.train_from_iterator(list(corpus), trainer=trainer)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="right",
        model_max_length=MAX_POSITIONS,
    )
