"""Learning from the job: dialogue files, the loss mask, SFT (full and LoRA), evaluation.

A tiny random-weight Llama with the bundled model's real tokenizer and chat template stands
in for the model, so that TRL's real trainer runs in seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from core.errors import DataError
from core.training.data import load_dialogues, parse_dialogue, rows, tokenize_row
from core.training.evaluate import assistant_log_loss, corpus_scores, perplexity
from core.training.sft import TrainOptions, save_model, train_sft
from tests.conftest import CACHE_DIR
from tests.processes import chatbot, chatbot_env

PERSONA = "You are the Harbor & Pine assistant."
DIALOGUES = [
    {"dialogue": ["how much is standard shipping?", "Standard shipping costs $5.95 per order."]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Can I return a used tent?"},
            {"role": "assistant", "content": "Items used outdoors cannot be returned."},
            {"role": "user", "content": "ok thanks"},
            {"role": "assistant", "content": "You're welcome!"},
        ]
    },
    {"dialogue": ["Hi! How can I help?", "where do you ship from", "From Portland, Oregon."]},
]


def tiny_model(tokenizer: Any, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def write_jsonl(path: Path, entries: list[Any]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


# -- data -----------------------------------------------------------------------------------


def test_both_formats_make_one_row_per_assistant_turn(tmp_path: Path) -> None:
    as_array = tmp_path / "a.json"
    as_array.write_text(json.dumps(DIALOGUES[:2]))
    as_lines = write_jsonl(tmp_path / "b.jsonl", DIALOGUES[2:])
    dialogues = load_dialogues([as_array, as_lines])
    found = rows(dialogues, PERSONA)
    assert [r.completion for r in found] == [
        "Standard shipping costs $5.95 per order.",
        "Items used outdoors cannot be returned.",
        "You're welcome!",
        "Hi! How can I help?",  # an odd number of turns starts with the assistant
        "From Portland, Oregon.",
    ]
    assert found[0].prompt[0] == {"role": "system", "content": PERSONA}
    assert found[1].prompt[0] == {"role": "system", "content": "Be brief."}  # its own
    assert [t["role"] for t in found[2].prompt] == ["system", "user", "assistant", "user"]
    assert [t["role"] for t in found[4].prompt] == ["system", "assistant", "user"]


def test_only_assistant_tokens_carry_loss_in_each_format(tokenizer: Any) -> None:
    for entry in (DIALOGUES[0], DIALOGUES[1]):
        dialogue = parse_dialogue(entry, "x")
        for row in rows([dialogue], PERSONA):
            encoded = tokenize_row(tokenizer, row, 1024)
            ids, mask = encoded["input_ids"], encoded["completion_mask"]
            learned = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
            assert learned == f"{row.completion}<|im_end|>\n"
            ignored = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
            assert ignored.endswith("<|im_start|>assistant\n")
            for turn in row.prompt:
                assert turn["content"] in ignored


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"dialogue": []}\n', "entry 1: 'dialogue' must be a non-empty list"),
        ('{"text": "hi"}\n', "entry 1: needs a 'dialogue' list or a 'messages' list"),
        ('\n{"dialogue": ["a", "b"]}\n{oops\n', "entry 3: not valid JSON"),
        (
            '{"messages": [{"role": "bot", "content": "hi"}]}',
            "entry 1: message 1: role 'bot' is not one of",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "entry 1: has no assistant turn"),
        ('{"dialogue": ["hi", 3]}', "entry 1: turn 2: expected text, got int"),
        ('[{"dialogue": ["a", "b"]}, {"dialogue": ["", "b"]}]', "entry 2: turn 1: is empty"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
            "two user turns in a row",
        ),
        ("", "holds no dialogues"),
    ],
)
def test_bad_files_name_the_file_the_entry_and_the_problem(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as raised:
        load_dialogues([path])
    assert str(raised.value).startswith(str(path)) and message in str(raised.value)


# -- evaluation -----------------------------------------------------------------------------


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity(tokenizer: Any) -> None:
    model = tiny_model(tokenizer).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each token has probability 1/V
    found = rows([parse_dialogue(e, "x") for e in DIALOGUES], PERSONA)
    total, tokens = assistant_log_loss(model, tokenizer, found, 1024)
    expected_tokens = sum(sum(tokenize_row(tokenizer, r, 1024)["completion_mask"]) for r in found)
    assert tokens == expected_tokens
    assert perplexity(total, tokens) == pytest.approx(model.config.vocab_size, rel=1e-4)


def test_bleu_and_chrf_of_identical_texts_are_100() -> None:
    texts = ["Standard shipping costs $5.95 per order.", "From Portland, Oregon."]
    assert corpus_scores(texts, texts) == (pytest.approx(100.0), pytest.approx(100.0))
    bleu, chrf = corpus_scores(["Something else entirely."] * 2, texts)
    assert bleu < 10 and chrf < 30


# -- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_a_few_sft_steps_lower_the_loss_and_write_a_loadable_model(
    tokenizer: Any, tmp_path: Path, lora: bool
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = rows([parse_dialogue(e, "x") for e in DIALOGUES], PERSONA)
    model = tiny_model(tokenizer)
    before = perplexity(*assistant_log_loss(model.eval(), tokenizer, train, 1024))
    out = tmp_path / "model"
    options = TrainOptions(
        out=out, learning_rate=5e-2 if lora else 5e-3, batch_size=2, max_steps=30, lora=lora
    )
    result = train_sft(model, tokenizer, train, options)
    assert result.steps == 30
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    after = perplexity(*assistant_log_loss(reloaded, tokenizer, train, 1024))
    # A LoRA adapter on a 32-wide random model moves its loss less than training all of it
    # (measured: perplexity -14 % against -60 % or more in 30 steps).
    assert after < before * (0.95 if lora else 0.7), (before, after)
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
    assert (out / "checkpoints").is_dir() and json.loads((out / "training.json").read_text())
    assert not math.isnan(result.first_loss)


def test_eval_and_train_commands(tokenizer: Any, tmp_path: Path) -> None:
    """`chatbot eval --json` writes DESIGN.md's keys; `train` refuses to overwrite."""
    model_dir = tmp_path / "tiny"
    save_model(tiny_model(tokenizer), tokenizer, model_dir)
    data = write_jsonl(tmp_path / "held-out.jsonl", DIALOGUES)
    env = chatbot_env(
        CHATBOT_CACHE_DIR=str(CACHE_DIR), CHATBOT_MAX_NEW_TOKENS="8", CHATBOT_DTYPE="float32"
    )
    out = tmp_path / "eval.json"
    proc = chatbot(
        ["eval", "--model", str(model_dir), "--data", str(data), "--json", str(out)], env, tmp_path
    )
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    result = json.loads(out.read_text())
    assert {"model", "dialogues", "assistant_tokens", "perplexity", "bleu", "chrf"} <= set(result)
    assert result["dialogues"] == 3 and result["assistant_tokens"] > 0
    assert result["perplexity"] > 1 and "perplexity" in stdout

    refused = chatbot(
        ["train", "sft", "--data", str(data), "--out", str(model_dir), "--base", str(model_dir)],
        env,
        tmp_path,
    )
    _, stderr = refused.communicate(timeout=300)
    assert refused.returncode == 2 and "is not empty" in stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"dialogue": []}])
    proc = chatbot(["eval", "--model", str(model_dir), "--data", str(bad)], env, tmp_path)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2 and f"{bad}: entry 1" in stderr and "Traceback" not in stderr


def test_training_without_data_rows_is_refused(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no assistant turns"):
        train_sft(tiny_model(tokenizer), tokenizer, [], TrainOptions(out=tmp_path / "m"))


def test_the_command_line_parser_knows_the_training_commands() -> None:
    from bot.cli import build_parser

    args = build_parser().parse_args(["train", "sft", "--data", "a.jsonl", "--out", "m", "--lora"])
    assert args.lora and args.out == Path("m")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "sft", "--out", "m"])  # --data is required
