"""The instruction task: prompts, loss labels, padding sides, answer extraction, beams, likelihood scoring."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_config

from ubsmoe.backbones import build_adapter
from ubsmoe.backbones.tiny import tiny_tokenizer
from ubsmoe.data.commonsense import BENCHMARKS
from ubsmoe.data.instruction_format import (
    IGNORE_INDEX,
    collate_left,
    collate_right,
    encode_train,
    format_prompt,
    pad_id_of,
)
from ubsmoe.model import FederatedModel
from ubsmoe.settings import LoraSettings, MethodSettings, ModelSettings
from ubsmoe.validate import validate
from ubsmoe.tasks.instruction import (
    InstructionTask,
    extract_answer,
    greedy_generate,
    left_pad,
    response_loss,
    score_candidates,
    score_candidates_cached,
)

TOK = tiny_tokenizer()
RECORD = {
    "instruction": "Please answer the following question with true or false, question: is ice cold?\n\n"
    "Answer format: true/false",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}


def make_task(mode: str = "both") -> InstructionTask:
    return InstructionTask(
        tokenizer=TOK,
        answer_patterns={k: b.pattern for k, b in BENCHMARKS.items()},
        answer_words={k: b.answer_words for k, b in BENCHMARKS.items()},
        eval_mode=mode,
        max_new_tokens=6,
    )


@pytest.fixture(scope="module")
def model() -> FederatedModel:
    settings = ModelSettings(
        name="tiny_olmoe", backbone="tiny:olmoe", adapter="native",
        lora=LoraSettings(rank=4, alpha=8, attention_targets=["q_proj", "v_proj"]),
    )  # fmt: skip
    module = FederatedModel(
        adapter=build_adapter("native"), task=make_task(), model=settings, method=MethodSettings(), num_tiers=4,
        init_seed=0,
    )  # fmt: skip
    return module.eval()


def test_alpaca_prompt_with_and_without_input() -> None:
    plain = format_prompt(RECORD)
    assert plain == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{RECORD['instruction']}\n\n### Response:\n"
    )
    with_input = format_prompt({**RECORD, "input": "some context"})
    assert "### Input:\nsome context\n\n### Response:\n" in with_input and "### Input:" not in plain


def test_labels_mask_the_prompt_and_keep_the_response() -> None:
    encoded = encode_train(TOK, RECORD, 1000)
    n_prompt = len(TOK(format_prompt(RECORD))["input_ids"])
    assert encoded["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    response = encoded["labels"][n_prompt:]
    assert TOK.decode(response[:-1]) == RECORD["output"] and response[-1] == TOK.eos_token_id
    assert encoded["input_ids"][n_prompt:] == response
    short = encode_train(TOK, RECORD, n_prompt)  # too long: the prompt loses its start, the response stays whole
    assert len(short["input_ids"]) == n_prompt and short["labels"][-len(response) :] == response
    kept = n_prompt - len(response)
    assert short["input_ids"][:kept] == TOK(format_prompt(RECORD))["input_ids"][-kept:]


def test_loss_depends_on_response_tokens_only() -> None:
    batch = collate_right([encode_train(TOK, RECORD, 1000), encode_train(TOK, {**RECORD, "output": "no"}, 1000)], 0)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, 300, generator=g, dtype=torch.float64)
    loss = response_loss(logits, batch["labels"])
    # Reference: mean cross-entropy over the positions whose next token is a response token.
    terms = []
    for b in range(2):
        for t in range(batch["input_ids"].shape[1] - 1):
            target = int(batch["labels"][b, t + 1])
            if target != IGNORE_INDEX:
                terms.append(-torch.log_softmax(logits[b, t], -1)[target])
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-6)
    first_response = int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0])
    perturbed = logits.clone()
    prompt_part = perturbed[:, : first_response - 1]
    prompt_part += torch.randn(prompt_part.shape, generator=g, dtype=torch.float64)
    changed = response_loss(perturbed, batch["labels"])
    # Both rows share the prompt: logits that predict prompt tokens carry no loss.
    assert float(changed) == pytest.approx(float(loss), rel=1e-12)
    predicting_response = logits.clone()
    predicting_response[0, first_response - 1] += torch.randn(300, generator=g, dtype=torch.float64)
    assert float(response_loss(predicting_response, batch["labels"])) != pytest.approx(float(loss), rel=1e-6)
    assert batch["labels"][batch["attention_mask"] == 0].eq(IGNORE_INDEX).all()


@pytest.mark.parametrize(("text", "benchmark", "expected"), [
    ("the correct answer is answer3", "social_i_qa", "answer3"),
    ("answer2, or maybe answer1", "ARC-Easy", "answer2"),            # first match wins
    ("I think false. true is wrong", "boolq", "false"),
    ("The answer is True", "boolq", None),                           # case-sensitive, as LLM-Adapters scores
    ("no idea", "piqa", None),                                        # no match counts as wrong
    ("ending4ending1", "hellaswag", "ending4"),
    ("the correct answer is option2", "winogrande", "option2"),
])  # fmt: skip
def test_answer_extraction_first_match(text: str, benchmark: str, expected: str | None) -> None:
    assert extract_answer(text, BENCHMARKS[benchmark].pattern) == expected


def test_likelihood_scorer_picks_the_planted_answer() -> None:
    """A model rigged to predict token 7 everywhere prefers the candidate made of 7s."""
    vocab = 20

    def rigged(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, vocab)
        logits[..., 7] = 5.0
        return logits[:, -keep:]

    candidates = [([3], [4, 5]), ([3], [7, 7]), ([3], [7, 2, 2])]
    scores = score_candidates(rigged, [[1, 2, 3], [9]], candidates, pad_id=0)
    assert scores.argmax(dim=1).tolist() == [1, 1]
    logp7 = torch.log_softmax(torch.tensor([0.0] * 7 + [5.0] + [0.0] * 12, dtype=torch.float64), 0)
    assert float(scores[0, 1]) == pytest.approx(2 * float(logp7[7]), rel=1e-6)


def test_batched_likelihood_equals_one_row_at_a_time(model: FederatedModel) -> None:
    task = model.task
    prompts = [TOK("is the sky green?")["input_ids"], TOK("hi")["input_ids"]]
    candidates = task.candidates("boolq")

    def logits_fn(ids, mask, positions, keep):
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "logits_to_keep": keep}
        return task.logits(model, batch)

    with torch.no_grad():
        scores = score_candidates(logits_fn, prompts, candidates, pad_id_of(TOK))
        for p, prompt in enumerate(prompts):
            for c, (extra, cont) in enumerate(candidates):
                row = torch.tensor([prompt + extra + cont])
                logits = task.logits(model, {"input_ids": row, "attention_mask": torch.ones_like(row)})
                logp = torch.log_softmax(logits.double(), -1)
                start = len(prompt) + len(extra)
                ref = sum(float(logp[0, start + j - 1, t]) for j, t in enumerate(cont))
                assert float(scores[p, c]) == pytest.approx(ref, abs=1e-4 * max(1.0, abs(ref)))


def test_cached_likelihood_equals_the_one_pass_scores(model: FederatedModel) -> None:
    """The evaluation's KV-cached scorer gives the numbers of the plain one-pass scorer (float64 reference)."""
    task = model.task
    prompts = [TOK(format_prompt(RECORD))["input_ids"], TOK("hi")["input_ids"], TOK("is it? yes or no")["input_ids"]]

    def logits_fn(ids, mask, positions, keep):
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "logits_to_keep": keep}
        return task.logits(model, batch)

    model.set_client(k=1)
    for benchmark in ("boolq", "ARC-Easy"):
        candidates = task.candidates(benchmark)
        with torch.no_grad():
            plain = score_candidates(logits_fn, prompts, candidates, pad_id_of(TOK))
        cached = score_candidates_cached(model, prompts, candidates, pad_id_of(TOK))
        torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        score_candidates_cached(model, prompts, [([1], [2]), ([3], [2])], 0)


def test_left_padding_gives_the_unpadded_greedy_tokens(model: FederatedModel) -> None:
    prompts = [TOK("a longer prompt, with words")["input_ids"], TOK("hi")["input_ids"], TOK("mid size")["input_ids"]]
    batch = collate_left([{"input_ids": p, "answer_index": 0} for p in prompts], pad_id_of(TOK))
    assert (batch["attention_mask"][:, -1] == 1).all() and batch["attention_mask"][1, 0] == 0
    model.set_client(k=2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    padded = greedy_generate(model, ids, mask, max_new_tokens=6, pad_id=0, eos_id=None)
    for i, prompt in enumerate(prompts):
        one = greedy_generate(
            model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=6, pad_id=0,
            eos_id=None,
        )  # fmt: skip
        assert padded[i].tolist() == one[0].tolist()


def test_generation_telemetry_counts_real_tokens_only(model: FederatedModel) -> None:
    prompts = [TOK("abcdef")["input_ids"], TOK("ab")["input_ids"]]
    ids, mask, _ = left_pad(prompts, 0)
    model.set_client(k=1)
    model.reset_telemetry()
    greedy_generate(model, ids, mask, max_new_tokens=3, pad_id=0, eos_id=None)
    tel = next(iter(model.telemetry().values()))
    # prefill: the real prompt tokens; then 2 decoding steps of one token per row (the 3rd token needs no forward)
    assert float(tel["tokens"]) == sum(len(p) for p in prompts) + 2 * len(prompts)
    assert float(tel["expert_tokens"].sum()) == float(tel["tokens"])  # K = 1 expert per real token


def test_evaluate_reports_every_benchmark_and_the_mean(model: FederatedModel) -> None:
    class Fabric:
        def to_device(self, b):
            return b

        def autocast(self):
            import contextlib

            return contextlib.nullcontext()

    items = {
        "boolq": [{"input_ids": TOK(format_prompt(RECORD))["input_ids"], "answer_index": 0}] * 3,
        "piqa": [{"input_ids": TOK("x")["input_ids"], "answer_index": 1}] * 2,
    }
    loaders = {k: [collate_left(v, 0)] for k, v in items.items()}
    result = model.task.evaluate(model, loaders, Fabric())
    m = result.metrics
    for name in ("boolq", "piqa"):
        assert {f"{name}/acc", f"{name}/acc_gen", f"{name}/acc_ll", f"{name}/no_answer"} <= set(m)
        assert m[f"{name}/acc"] == m[f"{name}/acc_gen"]  # both modes: generation is the main one
    assert result.main_metric == m["mean_acc"] == pytest.approx((m["boolq/acc"] + m["piqa/acc"]) / 2)
    assert m["mean_acc_ll"] == pytest.approx((m["boolq/acc_ll"] + m["piqa/acc_ll"]) / 2)


def test_console_shows_the_means_per_tier_and_each_benchmark_as_a_row() -> None:
    from types import SimpleNamespace

    from rich.console import Console

    from ubsmoe.callbacks.console_table import ConsoleTable
    from ubsmoe.settings import Tier

    names = ["mean_acc", "mean_acc_gen", "mean_acc_lik"]
    for b in BENCHMARKS:
        names += [f"{b}/acc", f"{b}/acc_gen", f"{b}/acc_lik", f"{b}/no_answer"]
    columns, rows = make_task().console_layout(names)
    assert columns == ["mean_acc", "mean_acc_gen", "mean_acc_lik"]
    assert rows == [f"{b}/acc" for b in BENCHMARKS]

    tiers = [Tier("t25", 0.25, 0.5), Tier("t100", 1.0, 0.5)]
    evaluation = {
        t.name: SimpleNamespace(metrics={n: 0.25 + i for n in names}, k=2, rank=None, utilization={},
                                flops_per_example=1e9)
        for i, t in enumerate(tiers)
    }  # fmt: skip
    out = Console(width=200, record=True, force_terminal=False)
    loop = SimpleNamespace(tiers=tiers, module=SimpleNamespace(task=make_task()))
    ConsoleTable(out).on_round_end(loop, SimpleNamespace(round=3, evaluation=evaluation, updates=[]))
    text = out.export_text()
    assert "per metric and tier" in text and f"{next(iter(BENCHMARKS))}/acc " in text and "1.2500" in text
    header = next(line for line in text.splitlines() if "tier" in line and "beta" in line)
    assert "no_answer" not in text and "acc_gen" not in header.replace("mean_acc_gen", "")

# --- LLM-Adapters' commonsense format, as its finetune.py (training) and commonsense_evaluate.py
# (evaluation) build it for a Commonsense-15K record, whitespace included -------------------------

PAD = " " * 16
TRAIN_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "  # noqa: E501\n\n"
    f"{PAD}### Instruction:\n{PAD}{RECORD['instruction']}\n{PAD}\n{PAD}### Response:\n{PAD}the correct answer is true"
)
EVAL_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    f"{PAD}### Instruction:\n{PAD}{RECORD['instruction']}\n\n{PAD}### Response:\n{PAD}"
)


def test_llm_adapters_prompts_keep_the_reference_text_and_whitespace() -> None:
    assert format_prompt(RECORD, "llm_adapters", training=True) + RECORD["output"] == TRAIN_TEXT
    assert format_prompt(RECORD, "llm_adapters") == EVAL_TEXT
    with_input = {**RECORD, "input": "some context"}
    assert format_prompt(with_input, "llm_adapters").endswith(
        f"{PAD}### Input:\n{PAD}some context\n\n{PAD}### Response:\n{PAD}"
    )
    assert format_prompt(with_input, "llm_adapters", training=True).endswith(
        f"{PAD}### Input:\n{PAD}some context\n{PAD}\n{PAD}### Response:\n{PAD}"
    )
    assert format_prompt(RECORD) == format_prompt(RECORD, training=True)  # alpaca: one text for both


def test_train_on_inputs_tokenizes_prompt_and_response_as_one_text_with_a_loss_on_every_token() -> None:
    encoded = encode_train(TOK, RECORD, 10_000, template="llm_adapters", train_on_inputs=True)
    expected = list(TOK(TRAIN_TEXT)["input_ids"]) + [TOK.eos_token_id]
    assert encoded["input_ids"] == expected
    assert encoded["labels"] == expected  # no -100: finetune.py's train_on_inputs=True
    masked = encode_train(TOK, RECORD, 10_000, template="llm_adapters", train_on_inputs=False)
    assert IGNORE_INDEX in masked["labels"]
    n_prompt = len(TOK(format_prompt(RECORD, "llm_adapters", training=True))["input_ids"])
    assert masked["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt


@pytest.mark.parametrize("benchmark", ["social_i_qa", "ARC-Easy", "ARC-Challenge", "openbookqa"])
def test_answer_patterns_match_answer1_to_answer5_as_the_reference(benchmark: str) -> None:
    pattern = BENCHMARKS[benchmark].pattern
    for i in range(1, 6):
        assert extract_answer(f"the correct answer is answer{i}", pattern) == f"answer{i}"
    # the first match wins even when it is not one of the benchmark's choices (a wrong answer, not a miss)
    assert extract_answer("answer5 then answer1", pattern) == "answer5"


def test_a_matched_word_that_is_no_choice_counts_as_a_wrong_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from ubsmoe.tasks import instruction

    task = instruction.InstructionTask(
        tokenizer=TOK, answer_patterns={"social_i_qa": BENCHMARKS["social_i_qa"].pattern},
        answer_words={"social_i_qa": BENCHMARKS["social_i_qa"].answer_words}, eval_mode="generation",
    )  # fmt: skip
    texts = ["the correct answer is answer5", "the correct answer is answer2", "no idea"]
    new = [TOK(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(n) for n in new)
    padded = torch.tensor([n + [TOK.eos_token_id] * (width - len(n)) for n in new])
    monkeypatch.setattr(instruction, "greedy_generate", lambda *a, **k: padded)
    batch = {"input_ids": torch.zeros(3, 1, dtype=torch.long), "attention_mask": torch.ones(3, 1, dtype=torch.long),
             "benchmark": "social_i_qa"}  # fmt: skip
    assert task.predict_generation(None, batch) == [-1, 1, None]


def test_beam_search_is_passed_to_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    from ubsmoe.tasks import instruction

    seen = {}

    class Backbone:
        def register_forward_pre_hook(self, *a, **k):
            return type("Handle", (), {"remove": lambda self: None})()

        def generate(self, **kwargs):
            seen.update(kwargs)
            return torch.cat([kwargs["input_ids"], torch.zeros(1, 2, dtype=torch.long)], dim=1)

    module = type("Module", (), {"backbone": Backbone(), "set_token_mask": lambda self, m: None})()
    ids = torch.ones(1, 3, dtype=torch.long)
    out = instruction.greedy_generate(module, ids, ids, max_new_tokens=2, pad_id=0, eos_id=None, num_beams=4)
    assert seen["num_beams"] == 4 and seen["do_sample"] is False and out.shape == (1, 2)


def test_commonsense_olmoe_uses_the_reference_values_and_the_tiny_run_stays_cheap() -> None:
    olmoe = compose_config("experiment=commonsense_olmoe")
    validate(olmoe)
    assert (olmoe.data.num_beams, olmoe.data.train_on_inputs, olmoe.data.prompt_template) == (4, True, "llm_adapters")
    assert olmoe.data.max_new_tokens == 32
    tiny = compose_config("experiment=commonsense_tiny")
    assert (tiny.data.num_beams, tiny.data.train_on_inputs, tiny.data.prompt_template) == (1, False, "alpaca")
