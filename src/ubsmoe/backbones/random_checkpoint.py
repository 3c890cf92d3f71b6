"""A local model folder with a released sparse decoder's architecture and no weights.

The GPU checks need the real shapes (OLMoE-1B-7B's 64 experts of width 1024 at top-8, and
so on) without the hub, so this module writes the released ``config.json`` values of an
architecture together with the offline byte-level tokenizer of :mod:`ubsmoe.backbones.tiny`.
The folder is then used as ``model.backbone=<folder> model.pretrained=false``: the native
adapter reads the config with ``AutoConfig``, draws random weights from it with the run's
init seed and reads the tokenizer with ``AutoTokenizer``. No weight file is written; none is
read when ``model.pretrained`` is false (``true`` on such a folder fails: there is nothing to load).

    python -m ubsmoe.backbones.random_checkpoint --arch olmoe-1b-7b --out /tmp/olmoe [--num-layers N]

``--set KEY=VALUE`` (repeatable; the value is read as JSON, else kept as text) changes any
other config value, e.g. ``--set hidden_size=64 --set intermediate_size=32`` for a folder a
CPU test can build. The config keeps the released vocabulary size (the embedding and LM head
have the released shapes) but its pad/bos/eos ids are the byte tokenizer's (0, 1, 2), so
padding and the end of a generation agree with the tokenizer; the byte tokenizer only
ever emits ids below 259.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ubsmoe.backbones.tiny import BOS, EOS, PAD, tiny_tokenizer
from ubsmoe.errors import ConfigError

# The released config.json values of each architecture (the hub id in "source"); only the
# keys that shape or route the model, the rest is the transformers default of the model type.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "olmoe-1b-7b": {
        "source": "allenai/OLMoE-1B-7B-0125",
        "model_type": "olmoe",
        "config": {
            "vocab_size": 50304, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
            "num_key_value_heads": 16, "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8,
            "norm_topk_prob": False, "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "attention_bias": False, "clip_qkv": None, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
            "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279,
        },
    },
    "qwen1.5-moe-a2.7b": {
        "source": "Qwen/Qwen1.5-MoE-A2.7B",
        "model_type": "qwen2_moe",
        "config": {
            "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
            "num_key_value_heads": 16, "intermediate_size": 5632, "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
            "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "max_position_embeddings": 8192, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
            "bos_token_id": 151643, "eos_token_id": 151643,
        },
    },
    "mixtral-8x7b": {
        "source": "mistralai/Mixtral-8x7B-v0.1",
        "model_type": "mixtral",
        "config": {
            "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "sliding_window": None,
            "router_aux_loss_coef": 0.02, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        },
    },
}  # fmt: skip


def architecture_config(arch: str, *, num_layers: int | None = None, overrides: dict[str, Any] | None = None):
    """The transformers config of ``arch`` with its released values, then ``num_layers`` and ``overrides``."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ConfigError("--arch", arch, f"one of {list(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    values = dict(spec["config"])
    if num_layers is not None:
        if num_layers < 1:
            raise ConfigError("--num-layers", num_layers, "a positive number of decoder layers")
        values["num_hidden_layers"] = num_layers
    values.update(overrides or {})
    return AutoConfig.for_model(spec["model_type"], **values)


def write_random_checkpoint(
    arch: str, out: str | Path, *, num_layers: int | None = None, overrides: dict[str, Any] | None = None
) -> Path:
    """Write ``config.json`` of ``arch`` and the byte-level tokenizer into ``out`` (no weights); return ``out``."""
    tokenizer = tiny_tokenizer()
    specials = (("pad", PAD), ("bos", BOS), ("eos", EOS))
    ids = {f"{name}_token_id": tokenizer.convert_tokens_to_ids(token) for name, token in specials}
    config = architecture_config(arch, num_layers=num_layers, overrides={**ids, **(overrides or {})})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value): the value read as JSON (numbers, true/false, null, lists), else as text."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", required=True, choices=list(ARCHITECTURES), help="released architecture to copy")
    parser.add_argument("--out", required=True, help="folder to write config.json and the tokenizer into")
    parser.add_argument("--num-layers", type=int, default=None, help="decoder layers (default: the released number)")
    parser.add_argument(
        "--set", dest="overrides", action="append", type=parse_override, default=[], metavar="KEY=VALUE",
        help="any other config value (JSON), e.g. hidden_size=64; repeatable",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = write_random_checkpoint(args.arch, args.out, num_layers=args.num_layers, overrides=dict(args.overrides))
    print(f"{args.arch} ({ARCHITECTURES[args.arch]['source']}) config + byte-level tokenizer -> {out}")
    print(f"use: model.backbone={out} model.pretrained=false (random weights; no weight file is needed)")
    return out


if __name__ == "__main__":
    main()
