"""``model.adapter: native``: a natively sparse decoder (OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral).

The model's own routers and fused expert tensors become UB-SMoE sparse blocks through
:func:`ubsmoe.backbones.native.convert` (by reference, no copy); this adapter loads the model
(hub id or local directory in ``model.dtype``, or a tiny random one: ``model.backbone:
tiny:<family>``), converts it with the run's options, puts peft LoRA on the attention
projections named in ``model.lora.attention_targets`` and counts FLOPs per token.

K_max is the checkpoint's configured top-k unless ``model.k_max`` says otherwise (up to E); a
client of budget beta runs K_c = max(1, floor(K_max * beta)). Methods without heterogeneous
experts (``method.sparse: false``, the rank baselines) keep every client at K_max and train the
same stacked expert LoRA (their rank varies instead), so their FFN cost is the model's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ubsmoe.backbones.base import BackboneAdapter, BuiltBackbone, Calibration
from ubsmoe.backbones.moefy_adapter import moe_options, quiet_transformers
from ubsmoe.backbones.native_convert import check_native_config, convert, decoder_dims, native_blocks, num_experts_of
from ubsmoe.backbones.tiny import FAMILIES, tiny_config, tiny_tokenizer
from ubsmoe.errors import ConfigError
from ubsmoe.seeding import derive_seed
from ubsmoe.settings import MethodSettings, ModelSettings
from ubsmoe.smoe.flops import decoder_flops_per_token
from ubsmoe.smoe.lora import inject_peft_lora

TINY_PREFIX = "tiny:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attention_projection_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the decoder's attention Linear modules (under ``self_attn``) ending in ``targets``."""
    names = []
    for name, sub in model.named_modules():
        if isinstance(sub, nn.Linear) and ".self_attn." in f".{name}" and any(name.endswith("." + t) for t in targets):
            names.append(name)
    return names


def load_tokenizer(model: ModelSettings) -> Any:
    """The tokenizer of ``model.backbone`` (a tiny model gets the offline byte-level tokenizer)."""
    if model.backbone.startswith(TINY_PREFIX):
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.backbone)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class NativeAdapter(BackboneAdapter):
    """Sparse decoder -> UB-SMoE blocks on its own experts, LoRA on attention (peft) and experts (stacked)."""

    name = "native"

    def check(self, model: ModelSettings, method: MethodSettings, head: str) -> Any:
        if head != "causal_lm":
            raise ConfigError(
                "model.adapter", self.name, f"a backbone that provides the '{head}' head (native: causal LM only)"
            )
        if model.dtype not in DTYPES:
            raise ConfigError("model.dtype", model.dtype, f"one of {list(DTYPES)}")
        if model.router_dtype is not None and model.router_dtype not in DTYPES:
            raise ConfigError("model.router_dtype", model.router_dtype, f"null or one of {list(DTYPES)}")

        config = self._config(model)
        check_native_config(config, model.k_max, model.backbone)
        return config

    def _config(self, model: ModelSettings) -> Any:
        if model.backbone.startswith(TINY_PREFIX):
            family = model.backbone.removeprefix(TINY_PREFIX)
            if family not in FAMILIES:
                raise ConfigError("model.backbone", model.backbone, f"tiny:<family> with family in {list(FAMILIES)}")
            return tiny_config(family)
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(model.backbone)
        except OSError as err:
            raise ConfigError(
                "model.backbone", model.backbone, f"a local model directory or a reachable hub id ({err})"
            ) from err

    def num_experts(self, config: Any, model: ModelSettings) -> int:
        return num_experts_of(config)

    def default_k_max(self, config: Any, model: ModelSettings) -> int:
        return int(config.num_experts_per_tok)

    def _load(self, model: ModelSettings, config: Any, init_seed: int) -> nn.Module:
        from transformers import AutoModelForCausalLM

        dtype = DTYPES[model.dtype]
        if model.backbone.startswith(TINY_PREFIX) or not model.pretrained:
            # Random weights (tiny CPU models): drawn from the run's init seed only.
            torch.manual_seed(derive_seed(init_seed, "weights"))
            net = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
            return net.to(dtype)
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(model.backbone, dtype=dtype, attn_implementation="sdpa")

    def build(
        self, model: ModelSettings, method: MethodSettings, *, head: str, num_tiers: int, init_seed: int,
        calibration: Calibration | None = None,
    ) -> BuiltBackbone:  # fmt: skip

        config = self.check(model, method, head)
        net = self._load(model, config, init_seed)
        net.requires_grad_(False)
        if model.gradient_checkpointing:
            # The sparse blocks recognise the recompute and neither re-count telemetry nor re-update D_i.
            net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if model.dropout is not None and hasattr(net.config, "attention_dropout"):
            net.config.attention_dropout = float(model.dropout)
        options = moe_options(model, method, num_tiers)
        convert(
            net, k_max=self.k_max(config, model), options=options,
            generator=torch.Generator().manual_seed(derive_seed(init_seed, "expert_lora")),
            router_dtype=DTYPES[model.router_dtype] if model.router_dtype else None,
            expert_kernel=model.expert_kernel, gate_norm=model.gate_norm,
        )  # fmt: skip
        blocks_by_path = native_blocks(net)
        lora = model.lora
        attention_names = attention_projection_names(net, list(lora.attention_targets))
        if lora.attention_targets and not attention_names:
            raise ConfigError(
                "model.lora.attention_targets", list(lora.attention_targets),
                "names of attention projections of the decoder (e.g. q_proj, k_proj, v_proj, o_proj)",
            )  # fmt: skip
        rank_tensors = inject_peft_lora(
            net, attention_names, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
            generator=torch.Generator().manual_seed(derive_seed(init_seed, "lora")),
        )  # fmt: skip
        modules = dict(net.named_modules())
        first = [n for n in attention_names if ".layers.0." in f".{n}"]
        shapes = []
        for n in first:
            base = modules[n].get_base_layer() if hasattr(modules[n], "get_base_layer") else modules[n]
            shapes.append((base.in_features, base.out_features))
        blocks = {path.removesuffix(".mlp"): block for path, block in blocks_by_path.items()}
        return BuiltBackbone(
            module=net,
            blocks=blocks,
            block_paths={layer: f"{layer}.mlp" for layer in blocks},
            rank_tensors=rank_tensors,
            hidden_size=int(config.hidden_size),
            num_experts=self.num_experts(config, model),
            extras={"attention_lora_shapes": tuple(shapes), "ffn_lora": bool(lora.ffn), "config": config},
        )

    def forward(self, backbone: nn.Module, batch: dict[str, Any]) -> Any:
        """Causal-LM output; ``position_ids`` (left-padded rows) and ``logits_to_keep`` pass through."""
        extra = {k: batch[k] for k in ("position_ids", "logits_to_keep") if k in batch}
        return backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **extra)

    # ------------------------------------------------------------------ FLOPs
    def _per_token(self, built: BuiltBackbone, seq_len: int, *, k: int, lora_rank: int) -> float:
        """Matrix-product FLOPs per token (:func:`ubsmoe.smoe.flops.decoder_flops_per_token`, LM head included)."""

        dims = decoder_dims(built.extras["config"], self.attention_lora_shapes(built))
        return decoder_flops_per_token(
            dims, seq_len, k=k, lora_rank=lora_rank, expert_lora=built.extras["ffn_lora"], lm_head=True
        )

    def body_flops(self, built: BuiltBackbone, seq_len: int, *, k: int, lora_rank: int, sparse: bool) -> float:
        return seq_len * self._per_token(built, seq_len, k=k, lora_rank=lora_rank)

    def reference_body_flops(self, built: BuiltBackbone, seq_len: int, *, lora_rank: int) -> float:
        """The model as released: its configured top-k experts per token."""
        top_k = int(built.extras["config"].num_experts_per_tok)
        return seq_len * self._per_token(built, seq_len, k=top_k, lora_rank=lora_rank)
