"""Instruction tuning of a causal LM, evaluated per commonsense benchmark (docs/design.md).

Batch format: :mod:`ubsmoe.data.instruction_format` (the Alpaca prompt, loss on the response
tokens only; training batches right-padded, evaluation prompts left-padded).

Evaluation, per benchmark (one loader each), at the module's current tier:

- ``generation``: greedy decoding of ``max_new_tokens`` tokens, then LLM-Adapters' scoring: the
  first (leftmost) match of the benchmark's answer words (a regex alternation, case-sensitive) in
  the generated text is the prediction; no match counts as wrong;
- ``likelihood``: the answer word whose tokens have the highest summed log-probability after the
  prompt and the response prefix ``likelihood_prefix`` (default "the correct answer is ", the
  start of every LLM-Adapters response) is the prediction. No generation: fast, and it never
  fails to answer. The prompt runs once per example (KV cache), then only the answer words'
  tokens run, once per word (:func:`score_candidates_cached`; :func:`score_candidates` is the
  one-pass reference it is tested against).

Metric keys: ``<benchmark>/acc`` (the main mode's accuracy), ``<benchmark>/acc_gen`` and
``<benchmark>/acc_ll`` (each mode that ran), ``<benchmark>/no_answer`` (generation: share of
outputs with no answer word), ``mean_acc`` (the main metric: the unweighted mean of
``<benchmark>/acc`` over benchmarks, as the papers report), ``mean_acc_gen``, ``mean_acc_ll``.
With ``eval_mode: both`` the main mode is generation (the papers' scoring).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.data.instruction_format import IGNORE_INDEX, pad_id_of
from ubsmoe.errors import ConfigError
from ubsmoe.names import EVAL_MODES
from ubsmoe.tasks.base import Task, TaskEvaluation, TaskModel

SUFFIX = {"generation": "gen", "likelihood": "ll"}  # metric-name suffix of each scoring mode


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens (labels != -100) of the batch."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )  # fmt: skip
    return total / (shift_labels != IGNORE_INDEX).sum().clamp_min(1)


def extract_answer(text: str, pattern: re.Pattern[str]) -> str | None:
    """The first (leftmost) match of the answer words in ``text``; ``None`` when there is none."""
    match = pattern.search(text)
    return match.group(0) if match else None


def continuation_ids(tokenizer: Any, prefix: str, word: str) -> tuple[list[int], list[int]]:
    """(context extra, continuation): ``prefix + word`` tokenized as the response is in training,
    split where the prefix's own tokens end; without a clean split the whole response is scored."""
    full = list(tokenizer(prefix + word, add_special_tokens=False)["input_ids"])
    head = list(tokenizer(prefix.rstrip(), add_special_tokens=False)["input_ids"]) if prefix.strip() else []
    if head and full[: len(head)] == head and len(full) > len(head):
        return head, full[len(head) :]
    return [], full


# (input_ids, attention_mask, position_ids, logits_to_keep) -> logits of the last `logits_to_keep` positions
LogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (0 at each row's first real token)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, length - len(r) :] = 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return ids, mask, positions


@torch.no_grad()
def score_candidates(
    logits_fn: LogitsFn,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
) -> torch.Tensor:
    """Summed log-probability of each candidate continuation after each prompt: ``[len(prompts), C]``.

    ``candidates[c] = (context extra, continuation)``. The prompt x candidate rows are left-padded
    so every continuation ends at the last position: the model returns logits for the last
    ``max continuation + 1`` positions only (a full ``[rows, length, vocab]`` tensor would not fit
    a GPU for a 50k vocabulary), and only the continuation's tokens are scored.
    """
    rows, lengths = [], []
    for prompt in prompts:
        for extra, cont in candidates:
            rows.append(list(prompt) + list(extra) + list(cont))
            lengths.append(len(cont))
    ids, mask, positions = left_pad(rows, pad_id)
    keep = max(lengths) + 1
    logp = torch.log_softmax(logits_fn(ids, mask, positions, keep).float().cpu(), dim=-1)  # [rows, keep, V]
    scores = torch.empty(len(rows), dtype=torch.float64)
    for i, n in enumerate(lengths):
        targets = ids[i, ids.shape[1] - n :]
        predicting = torch.arange(keep - n - 1, keep - 1)  # the kept positions whose next token is the target
        scores[i] = logp[i, predicting, targets].double().sum()
    return scores.reshape(len(prompts), len(candidates))


@torch.no_grad()
def score_candidates_cached(
    module: TaskModel,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
) -> torch.Tensor:
    """:func:`score_candidates` with the shared context run once: ``[len(prompts), C]``.

    The prompt and the common response prefix go through the model once (KV cache); the cache is
    repeated for the C answer words, and only their few tokens run again. Same numbers as the
    one-pass version (tested), about C times less compute on long prompts. Needs every candidate
    to share the same context extra (true for :func:`continuation_ids` with one prefix).
    """
    extras = {tuple(extra) for extra, _ in candidates}
    if len(extras) != 1:  # candidates with different contexts: no shared prefix to cache
        raise ValueError("score_candidates_cached needs one shared context for all candidates")
    extra = list(next(iter(extras)))
    device = next(module.backbone.parameters()).device
    ids, mask, positions = left_pad([list(p) + extra for p in prompts], pad_id)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    module.set_token_mask(mask.bool())
    out = module.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]: predicts each candidate's first token
    n_cand, conts = len(candidates), [list(c) for _, c in candidates]
    cache = out.past_key_values
    cache.batch_repeat_interleave(n_cand)
    length = max(len(c) for c in conts)
    rows = len(prompts) * n_cand
    cont_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((rows, length), dtype=torch.long)
    for r in range(rows):
        c = conts[r % n_cand]
        cont_ids[r, : len(c)] = torch.tensor(c)
        cont_mask[r, : len(c)] = 1
    cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
    start = mask.sum(1).repeat_interleave(n_cand).unsqueeze(1)  # each row's real context length
    module.set_token_mask(cont_mask.bool())
    rest = module.backbone(
        input_ids=cont_ids, attention_mask=torch.cat([mask.repeat_interleave(n_cand, 0), cont_mask], dim=1),
        position_ids=start + torch.arange(length, device=device), cache=cache, use_cache=True,
    )  # fmt: skip
    module.set_token_mask(None)
    logp = torch.log_softmax(rest.logits.float(), dim=-1).cpu()  # position j predicts continuation token j + 1
    first = first.cpu().repeat_interleave(n_cand, 0)
    scores = torch.empty(rows, dtype=torch.float64)
    for r in range(rows):
        c = conts[r % n_cand]
        total = first[r, c[0]].double()
        for j in range(1, len(c)):
            total = total + logp[r, j - 1, c[j]].double()
        scores[r] = total
    return scores.reshape(len(prompts), n_cand)


class _TokenMaskFromInputs:
    """Forward pre-hook for generation: real-token mask for the prefill, none for decoding steps.

    ``generate`` calls the model with the full-length attention mask but only the new tokens
    on decoding steps (all real); on the prefill the shapes agree and the left padding is masked.
    """

    def __init__(self, module: TaskModel) -> None:
        self.module = module

    def __call__(self, _model: nn.Module, args: tuple, kwargs: dict) -> None:
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        same = ids is not None and mask is not None and mask.dim() == 2 and mask.shape == ids.shape
        self.module.set_token_mask(mask if same else None)


@torch.no_grad()
def greedy_generate(
    module: TaskModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, pad_id: int,
    eos_id: int | None, num_beams: int = 1,
) -> torch.Tensor:
    """Greedy (``num_beams=1``) or beam-search continuation of left-padded prompts (KV cache); the new tokens only."""
    backbone = module.backbone
    handle = backbone.register_forward_pre_hook(_TokenMaskFromInputs(module), with_kwargs=True)
    try:
        out = backbone.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
            num_beams=num_beams, pad_token_id=pad_id, eos_token_id=eos_id,
        )  # fmt: skip
    finally:
        handle.remove()
        module.set_token_mask(None)
    return out[:, input_ids.shape[1] :]


class InstructionTask(Task):
    """Causal-LM loss on the response tokens; per-benchmark accuracy by generation and/or likelihood."""

    head = "causal_lm"
    main_metric = "mean_acc"

    def console_layout(self, metric_names: list[str]) -> tuple[list[str], list[str]]:
        """The means per tier in the table; each benchmark's accuracy (main mode) as a row of the second."""
        means = [n for n in metric_names if n.startswith("mean_acc")]
        per_benchmark = [n for n in metric_names if n.endswith("/acc")]
        return means, per_benchmark

    def __init__(
        self,
        *,
        tokenizer: Any,
        answer_patterns: Mapping[str, re.Pattern[str]],
        answer_words: Mapping[str, Sequence[str]],
        eval_mode: str = "likelihood",
        max_new_tokens: int = 32,
        likelihood_prefix: str = "the correct answer is ",
        num_beams: int = 1,
    ) -> None:
        if eval_mode not in EVAL_MODES:
            raise ConfigError("data.eval_mode", eval_mode, f"one of {list(EVAL_MODES)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError("data.max_new_tokens", max_new_tokens, "an integer >= 1")
        self.tokenizer = tokenizer
        self.answer_patterns = dict(answer_patterns)
        self.answer_words = {k: tuple(v) for k, v in answer_words.items()}
        self.eval_mode = eval_mode
        self.max_new_tokens = max_new_tokens
        self.likelihood_prefix = likelihood_prefix
        self.num_beams = num_beams  # data.num_beams: 4 in LLM-Adapters' commonsense_evaluate.py
        self.pad_id = pad_id_of(tokenizer)
        self._candidates: dict[str, list[tuple[list[int], list[int]]]] = {}

    # ------------------------------------------------------------------ training
    def build_head(self, hidden_size: int, generator: torch.Generator) -> None:
        return None  # the model's own (frozen) LM head

    def logits(self, module: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        module.set_token_mask(batch["attention_mask"].bool())
        return module.adapter.forward(module.backbone, batch).logits

    def loss(self, module: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return response_loss(self.logits(module, batch), batch["labels"])

    def head_flops(self, hidden_size: int, seq_len: int) -> float:
        return 0.0  # the LM head is part of the causal-LM backbone's count

    # ------------------------------------------------------------------ evaluation
    def candidates(self, benchmark: str) -> list[tuple[list[int], list[int]]]:
        if benchmark not in self._candidates:
            self._candidates[benchmark] = [
                continuation_ids(self.tokenizer, self.likelihood_prefix, w) for w in self.answer_words[benchmark]
            ]
        return self._candidates[benchmark]

    def predict_likelihood(self, module: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Index of the most likely answer word per prompt."""
        mask = batch["attention_mask"].bool()
        prompts = [row[m].tolist() for row, m in zip(batch["input_ids"].cpu(), mask.cpu())]

        return score_candidates_cached(module, prompts, self.candidates(batch["benchmark"]), self.pad_id).argmax(dim=1)

    def predict_generation(self, module: TaskModel, batch: dict[str, torch.Tensor]) -> list[int | None]:
        """Index of the answer word extracted from the greedy output (``None``: no match)."""
        new = greedy_generate(
            module, batch["input_ids"], batch["attention_mask"], max_new_tokens=self.max_new_tokens,
            pad_id=self.pad_id, eos_id=self.tokenizer.eos_token_id, num_beams=self.num_beams,
        )  # fmt: skip
        words = self.answer_words[batch["benchmark"]]
        pattern = self.answer_patterns[batch["benchmark"]]
        texts = self.tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)
        found = [extract_answer(t, pattern) for t in texts]
        return [None if f is None else words.index(f) if f in words else -1 for f in found]  # -1: a non-choice, wrong

    def evaluate(self, module: TaskModel, loaders: Mapping[str, Any], fabric: Any) -> TaskEvaluation:
        modes = ("generation", "likelihood") if self.eval_mode == "both" else (self.eval_mode,)
        metrics: dict[str, float] = {}
        per_mode: dict[str, list[float]] = {m: [] for m in modes}
        for benchmark, loader in loaders.items():
            correct = {m: 0 for m in modes}
            missing, total = 0, 0
            for batch in loader:
                batch = {**fabric.to_device(batch), "benchmark": benchmark}
                answers = batch["answer_index"].cpu()
                total += int(answers.numel())
                with fabric.autocast():
                    if "likelihood" in modes:
                        correct["likelihood"] += int((self.predict_likelihood(module, batch) == answers).sum())
                    if "generation" in modes:
                        found = self.predict_generation(module, batch)
                        missing += sum(f is None for f in found)
                        correct["generation"] += sum(f is not None and f == int(a) for f, a in zip(found, answers))
            for mode in modes:
                acc = correct[mode] / max(total, 1)
                metrics[f"{benchmark}/acc_{SUFFIX[mode]}"] = acc
                per_mode[mode].append(acc)
            if "generation" in modes:
                metrics[f"{benchmark}/no_answer"] = missing / max(total, 1)
            metrics[f"{benchmark}/acc"] = metrics[f"{benchmark}/acc_{SUFFIX[modes[0]]}"]  # the main mode's
        for mode, values in per_mode.items():
            metrics[f"mean_acc_{SUFFIX[mode]}"] = sum(values) / max(len(values), 1)
        metrics["mean_acc"] = metrics[f"mean_acc_{SUFFIX[modes[0]]}"]
        return TaskEvaluation(metrics=metrics, main_metric=metrics["mean_acc"])
