"""The instruction-tuning batch format: the Alpaca prompt, the response-only labels, the padding sides.

Training examples are the Alpaca prompt (:data:`PROMPT`, or :data:`PROMPT_WITH_INPUT` when
``input`` is non-empty) followed by the response (``output``) and EOS; prompt and response are
tokenized separately, so the prompt tokens that are masked out of the loss (label
:data:`IGNORE_INDEX`) are exactly the tokens an evaluation prompt has. Training batches are
right-padded; evaluation prompts are left-padded, so greedy generation appends to every row at
the same position.

The commonsense loader (:mod:`ubsmoe.data.commonsense`) encodes and batches with these; the
instruction task (:mod:`ubsmoe.tasks.instruction`) trains on and scores what they produce.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

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


def format_prompt(record: Mapping[str, Any]) -> str:
    """The Alpaca prompt of a record (the variant with ``### Input:`` when ``input`` is non-empty)."""
    extra = (record.get("input") or "").strip()
    if extra:
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=extra)
    return PROMPT.format(instruction=record["instruction"])


def prompt_ids(tokenizer: Any, record: Mapping[str, Any], max_length: int) -> list[int]:
    """Token ids of the prompt, its end kept when too long (the answer format sits at the end)."""
    ids = list(tokenizer(format_prompt(record))["input_ids"])
    return ids[-max_length:]


def encode_train(tokenizer: Any, record: Mapping[str, Any], max_length: int) -> dict[str, list[int]]:
    """``input_ids`` = prompt + response + EOS, ``labels`` = -100 on the prompt (loss on the response only).

    Too long: the prompt loses its beginning (as evaluation prompts do) so that the response, the
    only part with a loss, always fits; a response longer than ``max_length - 1`` keeps its start.
    """
    response = record.get("output") or record["answer"]
    target = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        target.append(int(tokenizer.eos_token_id))
    target = target[: max_length - 1]
    prompt = prompt_ids(tokenizer, record, max_length - len(target))
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
