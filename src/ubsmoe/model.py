"""The LightningModule every client trains: a frozen backbone with adapters, plus a task.

One :class:`FederatedModel` is built per run and reused by every client: the engine
loads a client's trainable state into it, sets the client's budget (:meth:`set_client`),
builds a fresh optimizer and trains. Only the trainable tensors (LoRA, router, phi, head,
tier scales) ever leave the module, as a flat dict of named tensors that a server can
aggregate without knowing the architecture.

It composes one backbone adapter (:mod:`ubsmoe.backbones`: ``moefy`` cuts a dense
encoder's FFNs into experts, ``native`` converts a sparse decoder's own experts) and one
task (:mod:`ubsmoe.tasks`: GLUE classification, instruction tuning), docs/design.md.
Everything the engine touches (budget, state exchange, telemetry, PG, optimizer groups)
is defined here once, on the sparse-block surface the adapters share; the head, the loss
and the evaluation belong to the task. :class:`FederatedClassifier` is the GLUE
composition (moefy + classification) with the constructor it always had.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning
import torch
import torchmetrics

from ubsmoe.backbones import build_adapter
from ubsmoe.backbones.base import BackboneAdapter, Calibration
from ubsmoe.backbones.moefy_adapter import resolve_backbone_path
from ubsmoe.errors import ConfigError
from ubsmoe.names import POOLINGS, ROUTER_INITS
from ubsmoe.seeding import derive_seed
from ubsmoe.settings import MethodSettings, ModelSettings, OptimSettings
from ubsmoe.smoe.flops import EncoderDims, measure_flops
from ubsmoe.smoe.lora import RankLimiter, client_lora_scaling, peft_lora_layers, set_peft_scaling
from ubsmoe.smoe.moefy import check_moefy_args
from ubsmoe.smoe.pseudo_grad import add_expert_pseudo_gradients, missed_token_steps, pseudo_gradient_coefficients
from ubsmoe.smoe.routing import range_penalty
from ubsmoe.tasks.base import Task
from ubsmoe.tasks.classification import ClassificationTask

__all__ = ("FederatedClassifier", "FederatedModel", "check_model", "resolve_backbone_path")


def _check_settings(model: ModelSettings, method: MethodSettings, num_labels: int | None, num_tiers: int) -> None:
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
    if num_labels is not None and num_labels < 1:
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
    return build_adapter(model.adapter).check(model, method, ClassificationTask.head)


class FederatedModel(lightning.LightningModule):
    """One backbone adapter (frozen backbone + sparse blocks + LoRA) composed with one task."""

    def __init__(
        self,
        *,
        adapter: BackboneAdapter,
        task: Task,
        model: ModelSettings,
        method: MethodSettings,
        num_tiers: int,
        init_seed: int,
        optim: OptimSettings | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        """``calibration``: unlabeled training batches for a data-driven construction of the
        sparse blocks (``model.moefy``), with the directory its result is cached in."""
        super().__init__()
        self.adapter = adapter
        self.task = task
        self.optim_settings = optim or OptimSettings()
        self.method = method
        self.num_tiers = num_tiers
        self.sparse = bool(method.sparse)
        _check_settings(model, method, None, num_tiers)
        config = adapter.check(model, method, task.head)
        # Construction draws only from generators seeded by init_seed; the global RNG
        # (which peft's own init consumes) is restored afterwards.
        with torch.random.fork_rng(devices=[]):
            built = adapter.build(
                model, method, head=task.head, num_tiers=num_tiers, init_seed=init_seed, calibration=calibration
            )
            head = task.build_head(built.hidden_size, torch.Generator().manual_seed(derive_seed(init_seed, "head")))
        # num_experts: the adapter's (M for moefy, the checkpoint's E for native).
        self.model_settings = replace(model, num_experts=built.num_experts)
        self.k_max = adapter.k_max(config, self.model_settings)
        self.built = built
        self.blocks = built.blocks
        if head is not None:
            self.head = head
        self.backbone = built.module
        self.metrics = getattr(task, "metrics", None)  # registered, so it follows the module's device
        rank_tensors = list(built.rank_tensors)
        lora = model.lora

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
        self.k = self.k_max if self.sparse else None
        self._peft_layers = peft_lora_layers(self.backbone)
        self.tier_index = 0
        self._original_weights: dict[str, torch.Tensor] = {}  # W0 of modules with a base delta (FLoRA)
        self._pending_pg_steps: list[tuple[SparseMoE, list[torch.Tensor | None]]] = []

    # ------------------------------------------------------------------ structure
    def _group_of(self, name: str) -> str | None:
        if name.startswith("head."):
            return "head"
        if "lora_" in name or name.endswith(".tier_scale"):
            return "lora"
        if self.adapter.is_router_param(name) and self.sparse:
            return "router"
        if name.endswith(".phi") and self.sparse and self.method.dmr.enabled:
            return "phi"
        return None

    def _block_prefix(self, layer_name: str) -> str:
        return f"backbone.{self.built.block_paths[layer_name]}"

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
            k = self.k_max if k is None else k
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
        scaling = client_lora_scaling(self.method.lora_scaling, self.model_settings.lora.alpha, full, rank)
        set_peft_scaling(self._peft_layers, scaling)
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
        """The router-side PG defaults D [M, h] per layer; empty (nothing exchanged) when ``method.pg.router`` is off.

        They are the project's addition, not in the paper: L * M * h numbers each way a round,
        against the paper's L * (M + 1) of extra traffic.
        """
        if not self.method.pg.router:
            return {}
        return {name: block.pg_default.detach().cpu().clone() for name, block in self.blocks.items()}

    @torch.no_grad()
    def set_pg_defaults(self, defaults: dict[str, torch.Tensor]) -> None:
        if not defaults and not self.method.pg.router:
            return
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
    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Tell every sparse block which tokens are real ([batch, length] bool); padding is never routed."""
        token_mask = None if mask is None or bool(mask.all()) else mask.bool()  # no padding: nothing to skip
        for block in self.blocks.values():
            block.token_mask = token_mask

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The task's prediction (class logits, or LM logits for instruction tasks)."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        return self.task.logits(self, batch)

    def _logits(self, batch: dict) -> torch.Tensor:
        return self.task.logits(self, batch)

    def regularizer(self) -> torch.Tensor:
        """DMR range penalty on every phi (when DMR is on) plus the Switch balance loss (when asked)."""
        total = torch.zeros((), device=self.device)
        dmr = self.method.dmr
        for block in self.blocks.values():
            if dmr.enabled and dmr.penalty > 0:
                total = total + range_penalty(block.phi, dmr.phi_min, dmr.phi_max, dmr.penalty)
            if self.method.balance_loss > 0 and block.aux_loss is not None:
                total = total + self.method.balance_loss * block.aux_loss
        return total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.task.loss(self, batch) + self.regularizer()

    def on_after_backward(self) -> None:
        """PG expert signal from this step's routing statistics, then reset them.

        ``shared_mean`` adds to the gradients now; ``missed_tokens`` prepares per-expert steps
        that :meth:`apply_expert_pseudo_steps` applies after the optimizer step.
        """
        pg = self.method.pg
        self._pending_pg_steps = []
        for block in self.blocks.values():
            if pg.expert and block.lora is not None and block.k < block.num_experts:
                c = block.counters("step")
                coefficients = pseudo_gradient_coefficients(
                    c["tokens"], c["inactive_mass"], c["active_mass"], c["active_assignments"], block.k, pg.eta
                )
                # both block kinds fill block.pg_sink in their kernels' backward (missed_tokens)
                if pg.expert_mode == "shared_mean":
                    add_expert_pseudo_gradients(block.lora.tensors(), c["expert_tokens"], coefficients)
                elif block.pg_sink is not None:
                    self._pending_pg_steps.append((block, missed_token_steps(block.pg_sink, coefficients)))
            block.reset_step()

    @torch.no_grad()
    def apply_expert_pseudo_steps(self, lr: float) -> None:
        """Move each expert's LoRA by ``lr`` times its prepared missed-token step (outside the optimizer)."""
        for block, steps in self._pending_pg_steps:
            for tensor, step in zip(block.lora.tensors(), steps, strict=True):
                if step is not None:
                    tensor.add_(step.to(tensor.dtype), alpha=lr)
        if self._pending_pg_steps:
            self.rank_limiter.apply()
        self._pending_pg_steps = []

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        lr = next((g["lr"] for g in optimizer.param_groups if g.get("name") == "lora"), None)
        if lr is not None:
            self.apply_expert_pseudo_steps(float(lr))

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate one evaluation batch (tasks with per-batch metrics, e.g. classification)."""
        self.task.validation_step(self, batch)

    def compute_validation(self) -> dict[str, float]:
        return self.task.compute_validation()

    def evaluate(self, loaders: dict[str, Any], fabric: Any) -> Any:
        """The task's evaluation of the module as it stands (tier and payload already loaded)."""
        return self.task.evaluate(self, loaders, fabric)

    def configure_optimizers(self, lr_factor: float = 1.0) -> torch.optim.Optimizer:
        """A fresh AdamW over the trainable groups, each at its rate times ``lr_factor`` (the round's schedule)."""
        optim = self.optim_settings
        lrs = {"lora": optim.lr, "head": optim.head_lr, "router": optim.router_lr, "phi": optim.phi_lr}
        params = dict(self.named_parameters())
        groups = [
            {"params": [params[n] for n in names], "lr": lrs[group] * lr_factor, "name": group}
            for group, names in self._groups.items()
            if names
        ]
        optimizer = torch.optim.AdamW(groups, lr=optim.lr * lr_factor, weight_decay=optim.weight_decay)
        # PG's missed-token steps are applied after AdamW's, at the LoRA group's learning rate
        optimizer.register_step_post_hook(self._after_optimizer_step)
        return optimizer

    # ------------------------------------------------------------------ compute
    def encoder_dims(self) -> EncoderDims:
        """The encoder shapes FLOPs depend on (moefy backbones only)."""
        return self.adapter.encoder_dims(self.built, getattr(self.task, "num_labels", 0))

    def flops_per_example(self, seq_len: int) -> float:
        """Analytic forward FLOPs of one unpadded example at the current K (sparse) and LoRA rank."""
        k = self.k if self.k is not None else self.k_max
        body = self.adapter.body_flops(self.built, seq_len, k=k, lora_rank=self.rank_limiter.rank, sparse=self.sparse)
        return body + self.task.head_flops(self.built.hidden_size, seq_len)

    def reference_flops_per_example(self, seq_len: int) -> float:
        """FLOPs of the reference model (``flops_ratio_to_dense``) at full LoRA rank: the dense FFN for
        moefy backbones, the native model at its configured top-k for native ones."""
        body = self.adapter.reference_body_flops(self.built, seq_len, lora_rank=self.model_settings.lora.rank)
        return body + self.task.head_flops(self.built.hidden_size, seq_len)

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


class FederatedClassifier(FederatedModel):
    """The GLUE composition: a moefy encoder (``model.adapter``) with a classification/regression head."""

    def __init__(
        self,
        *,
        model: ModelSettings,
        method: MethodSettings,
        num_labels: int,
        metrics: torchmetrics.MetricCollection,
        num_tiers: int,
        init_seed: int,
        main_metric: str = "accuracy",
        optim: OptimSettings | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        _check_settings(model, method, num_labels, num_tiers)
        super().__init__(
            adapter=build_adapter(model.adapter),
            task=ClassificationTask(
                num_labels=num_labels, metrics=metrics, pooling=model.pooling, main_metric=main_metric
            ),
            model=model,
            method=method,
            num_tiers=num_tiers,
            init_seed=init_seed,
            optim=optim,
            calibration=calibration,
        )
        self.num_labels = num_labels
