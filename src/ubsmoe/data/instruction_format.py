"""The instruction-tuning batch format: the Alpaca prompt, the loss labels, the padding sides.

Training examples are the Alpaca prompt (:data:`PROMPT`, or :data:`PROMPT_WITH_INPUT` when
``input`` is non-empty) followed by the response (``output``) and EOS. ``data.prompt_template``
picks the prompt's text: ``alpaca`` (clean whitespace, the same text for training and
evaluation) or ``llm_adapters`` (LLM-Adapters' own strings: ``finetune.py``'s for training,
``commonsense_evaluate.py``'s for evaluation, indentation included). ``data.train_on_inputs``
picks the loss: on the response only (prompt and response tokenized apart, so the masked
prompt tokens are exactly the training prompt's; label :data:`IGNORE_INDEX`) or on every
token (LLM-Adapters' default, prompt and response tokenized as one text). Training batches are
right-padded; evaluation prompts are left-padded, so greedy generation appends to every row at
the same position.

The commonsense loader (:mod:`ubsmoe.data.commonsense`) encodes and batches with these; the
instruction task (:mod:`ubsmoe.tasks.instruction`) trains on and scores what they produce.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ubsmoe import names

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptTemplate:
    """The prompt text of a record, for training (the response follows it) and for evaluation.

    ``*_with_input`` are the variants with an ``### Input:`` section, used when a record's
    ``input`` is non-empty. Placeholders: ``{instruction}``, ``{input}``.
    """

    train: str
    train_with_input: str
    evaluate: str
    evaluate_with_input: str


_INDENT = " " * 16  # LLM-Adapters writes its prompts inside indented triple-quoted strings
_REQUEST = "Write a response that appropriately completes the request."
_HEAD = "Below is an instruction that describes a task. " + _REQUEST
_HEAD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. " + _REQUEST
)
_NOQA = "  # noqa: E501"  # inside finetune.py's string, so part of every training prompt there
_WITH_INPUT = (("Instruction", "{instruction}"), ("Input", "{input}"))


def _indented(head: str, sections: Sequence[tuple[str, str]], blank: str) -> str:
    """``head``, then each ``### title:`` section and the response header, every line indented as LLM-Adapters'."""
    body = (f"\n{blank}\n").join(f"{_INDENT}### {title}:\n{_INDENT}{value}" for title, value in sections)
    return f"{head}\n\n{body}\n{blank}\n{_INDENT}### Response:\n{_INDENT}"


TEMPLATES: dict[str, PromptTemplate] = {  # keys: ubsmoe.names.PROMPT_TEMPLATES
    # the Alpaca prompt with clean whitespace, the same text for training and evaluation
    "alpaca": PromptTemplate(
        train=PROMPT, train_with_input=PROMPT_WITH_INPUT, evaluate=PROMPT, evaluate_with_input=PROMPT_WITH_INPUT
    ),
    # LLM-Adapters' own text: finetune.py's generate_prompt for training, commonsense_evaluate.py's for evaluation
    "llm_adapters": PromptTemplate(
        train=_indented(_HEAD + _NOQA, [("Instruction", "{instruction}")], _INDENT),
        train_with_input=_indented(_HEAD_WITH_INPUT + _NOQA, _WITH_INPUT, _INDENT),
        evaluate=_indented(_HEAD + " ", [("Instruction", "{instruction}")], ""),
        evaluate_with_input=_indented(_HEAD_WITH_INPUT, _WITH_INPUT, ""),
    ),
}

assert tuple(TEMPLATES) == names.PROMPT_TEMPLATES, "ubsmoe.names.PROMPT_TEMPLATES must list TEMPLATES' keys"


def format_prompt(record: Mapping[str, Any], template: str = "alpaca", *, training: bool = False) -> str:
    """The prompt of a record in ``template`` (``data.prompt_template``), for training or evaluation.

    The variant with ``### Input:`` is used when ``input`` is non-empty. LLM-Adapters' own
    template differs between its training script and its evaluation script (whitespace, and
    the ``# noqa`` comment that sits inside the training string), and both are kept.
    """
    chosen = TEMPLATES[template]
    extra = (record.get("input") or "").strip()
    if extra:
        text = chosen.train_with_input if training else chosen.evaluate_with_input
        return text.format(instruction=record["instruction"], input=extra)
    return (chosen.train if training else chosen.evaluate).format(instruction=record["instruction"])


def prompt_ids(tokenizer: Any, record: Mapping[str, Any], max_length: int, template: str = "alpaca") -> list[int]:
    """Token ids of the evaluation prompt, its end kept when too long (the answer format sits at the end)."""
    ids = list(tokenizer(format_prompt(record, template))["input_ids"])
    return ids[-max_length:]


def response_text(record: Mapping[str, Any]) -> str:
    """The response a record trains on: its ``output`` (LLM-Adapters' full answer sentence), else ``answer``."""
    return record.get("output") or record["answer"]


def encode_train(
    tokenizer: Any,
    record: Mapping[str, Any],
    max_length: int,
    *,
    template: str = "alpaca",
    train_on_inputs: bool = False,
) -> dict[str, list[int]]:
    """``input_ids`` = training prompt + response + EOS and the ``labels`` of the loss.

    ``train_on_inputs=False``: ``labels`` = -100 on the prompt (loss on the response only; prompt
    and response tokenized apart, so the masked tokens are exactly the prompt's).
    ``train_on_inputs=True`` (LLM-Adapters' ``finetune.py`` default): prompt and response are
    tokenized as one text, as there, and every token has a loss.
    Too long: the prompt loses its beginning (as evaluation prompts do) so that the response
    always fits; a response longer than ``max_length - 1`` keeps its start.
    """
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if train_on_inputs:
        ids = list(tokenizer(format_prompt(record, template, training=True) + response_text(record))["input_ids"])
        ids = (ids + eos)[-max_length:]
        return {"input_ids": ids, "labels": list(ids)}
    target = list(tokenizer(response_text(record), add_special_tokens=False)["input_ids"]) + eos
    target = target[: max_length - 1]
    prompt = list(tokenizer(format_prompt(record, template, training=True))["input_ids"])[-(max_length - len(target)) :]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


def pad_id_of(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS (decoders often have no pad token), else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def collate_right(features: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Training batch: right padding; padded label positions are -100."""
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), length), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_left(features: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Evaluation batch: prompts left-padded, plus the index of the right answer word."""
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), length), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, length - n :] = torch.tensor(f["input_ids"])
        mask[i, length - n :] = 1
    answers = torch.tensor([int(f["answer_index"]) for f in features], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "answer_index": answers}
