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
from tests.helpers import tiny_llama
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
    return tiny_llama(tokenizer, seed, max_positions=1024)


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


@pytest.mark.slow
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


# -- from the service: export, KTO, DPO -----------------------------------------------------


async def seed_service_data(redis: Any, settings: Any) -> dict[str, Any]:
    """Three conversations as the service would have stored them: a 👍 answer, a 👎 answer a
    human agent corrected after a handoff, and one of a user who then asked to be forgotten."""
    import time

    from core.conversation import ConversationKey, Message, Reply, ReplyId, Role
    from core.keys import Keys
    from core.store import ConversationStore
    from core.support.feedback import Feedback

    keys = Keys(settings.namespace)
    store = ConversationStore.from_settings(redis, settings)
    feedback = Feedback(redis, keys, settings.history_ttl_s)

    async def say(conv: ConversationKey, role: Role, text: str, author: str, kind: str = "") -> str:
        count = len(await store.history(conv))
        message_id = str(ReplyId.answer(conv, count + 1)) if role is Role.ASSISTANT else f"m{count}"
        await store.add_message(
            conv, Message(role, text, author, author.upper(), message_id, time.time())
        )
        if kind:
            await feedback.record_reply(Reply(message_id, conv, text, "m", count + 1, kind=kind))
        return message_id

    good = ConversationKey("slack", "T1", "C1", "1.0")
    await say(good, Role.USER, "how much is shipping? mail me at ann@example.com", "u1")
    liked = await say(good, Role.ASSISTANT, "Standard shipping costs $5.95.", "assistant", "answer")
    await feedback.rate(liked, "u1", helpful=True)

    bad = ConversationKey("slack", "T1", "C1", "2.0")
    await say(bad, Role.USER, "can I return a used tent? call me on +1 415 555 0134", "u2")
    wrong = await say(bad, Role.ASSISTANT, "Yes, any tent can be returned.", "assistant", "answer")
    await feedback.rate(wrong, "u2", helpful=False)
    await say(bad, Role.USER, "talk to a person", "u2")
    await say(bad, Role.ASSISTANT, "A person will join shortly.", "assistant", "handoff")
    await say(bad, Role.HUMAN_AGENT, "Tents used outdoors cannot be returned, sorry.", "agent1")

    gone = ConversationKey("slack", "T1", "C2", "3.0")
    await say(gone, Role.USER, "secret question from zed", "u3")
    disliked = await say(gone, Role.ASSISTANT, "An answer to zed.", "assistant", "answer")
    await feedback.rate(disliked, "u3", helpful=False)
    return {"keys": keys, "store": store}


async def test_export_masks_pii_drops_the_forgotten_and_makes_each_kind(
    redis: Any, settings: Any
) -> None:
    from core.support.privacy import UserData
    from core.training.export import export

    seeded = await seed_service_data(redis, settings)
    await UserData(redis, seeded["keys"], settings.history_ttl_s).forget("slack", "u3")
    exported = {
        kind: await export(redis, seeded["keys"], seeded["store"], kind)
        for kind in ("sft", "kto", "dpo")
    }
    dump = json.dumps(exported)
    assert "ann@example.com" not in dump and "555 0134" not in dump
    assert "[email]" in dump and "[phone]" in dump
    assert "zed" not in dump  # the forgotten user's words and the answers to them
    sft = sorted(exported["sft"], key=lambda r: len(r["messages"]))
    assert len(sft) == 2
    roles = [t["role"] for t in sft[1]["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    # The handoff notice is the service talking, not an answer: the agent's words are the
    # target after the customer's request.
    assert sft[1]["messages"][-1]["content"] == "Tents used outdoors cannot be returned, sorry."
    assert sorted((r["label"], r["completion"][0]["content"]) for r in exported["kto"]) == [
        (False, "Yes, any tent can be returned."),
        (True, "Standard shipping costs $5.95."),
    ]
    [pair] = exported["dpo"]
    assert pair["chosen"][0]["content"] == "Tents used outdoors cannot be returned, sorry."
    assert pair["rejected"][0]["content"] == "Yes, any tent can be returned."
    assert pair["prompt"][-1]["role"] == "user" and "[phone]" in pair["prompt"][-1]["content"]


@pytest.mark.parametrize("method", ["kto", "dpo"])
async def test_kto_and_dpo_train_a_step_on_exported_data(
    redis: Any, settings: Any, tokenizer: Any, tmp_path: Path, method: str
) -> None:
    import asyncio

    from transformers import AutoModelForCausalLM

    from core.training.export import export
    from core.training.preference import train_preference

    seeded = await seed_service_data(redis, settings)
    exported = await export(redis, seeded["keys"], seeded["store"], method)  # type: ignore[arg-type]
    out = tmp_path / method
    options = TrainOptions(out=out, learning_rate=1e-3, batch_size=2, max_steps=2)
    model = tiny_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = await asyncio.to_thread(
        train_preference, method, model, tokenizer, exported, PERSONA, options
    )
    assert result.steps == 2 and not math.isnan(result.first_loss)
    trained = AutoModelForCausalLM.from_pretrained(out)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no weight moved"


def test_kto_needs_both_kinds_of_rating() -> None:
    from core.training.preference import check_rows

    row = {"prompt": [{"role": "user", "content": "q"}], "completion": [], "label": True}
    with pytest.raises(DataError, match="needs both"):
        check_rows("kto", [row, row], "x.jsonl")
    with pytest.raises(DataError, match="entry 1: missing chosen, rejected"):
        check_rows("dpo", [{"prompt": []}], "x.jsonl")


# -- promotion, hot swap, rollback ----------------------------------------------------------


@pytest.mark.slow
def test_promote_refuses_a_worse_model_accepts_a_better_one_and_rolls_back(
    tokenizer: Any, tmp_path: Path, redis_server: Any, namespace: str
) -> None:
    data = write_jsonl(tmp_path / "held-out.jsonl", DIALOGUES)
    serving, better, worse = tmp_path / "serving", tmp_path / "better", tmp_path / "worse"
    save_model(tiny_model(tokenizer), tokenizer, serving)
    train = rows([parse_dialogue(e, "x") for e in DIALOGUES], PERSONA)
    # Trained until it says the reference replies: better on every metric.
    train_sft(
        tiny_model(tokenizer),
        tokenizer,
        train,
        TrainOptions(out=better, learning_rate=1e-2, batch_size=5, max_steps=100),
    )
    peaked = tiny_model(tokenizer, seed=1)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(300.0)  # confidently wrong: a much higher perplexity
    save_model(peaked, tokenizer, worse)
    env = chatbot_env(
        REDIS_URL=redis_server.url,
        CHATBOT_NAMESPACE=namespace,
        CHATBOT_MODEL=str(serving),
        CHATBOT_CACHE_DIR=str(CACHE_DIR),
        CHATBOT_MAX_NEW_TOKENS="8",
        CHATBOT_DTYPE="float32",
        CHATBOT_PERSONA=PERSONA,
    )

    def run(*args: str) -> tuple[int, str, str]:
        proc = chatbot(["model", *args], env, tmp_path)
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err

    code, out, err = run("promote", str(worse), "--data", str(data))
    assert code == 2 and "refused: the candidate is worse: perplexity" in err, err
    assert "candidate: perplexity" in out and "serving: perplexity" in out
    code, out, err = run("promote", str(better), "--data", str(data))
    assert code == 0, err
    code, out, _ = run("list")
    assert out.startswith(f"serving: {better}") and "promoted" in out
    code, out, err = run("promote", str(worse), "--data", str(data), "--force")
    assert code == 0 and "with --force" in err
    code, out, _ = run("rollback")
    assert code == 0 and f"workers now serve {better}" in out
    code, out, _ = run("rollback")
    assert code == 0 and f"workers now serve {serving}" in out
    code, _, err = run("rollback")
    assert code == 2 and "nothing to roll back" in err
    code, out, _ = run("list")
    assert "(CHATBOT_MODEL)" in out and out.count("rolled back") == 2 and "(forced)" in out


class TinyLoader:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.retired: list[Any] = []

    async def load(self, model: str) -> Any:
        from transformers import AutoModelForCausalLM

        from core.generation.transformers_engine import TransformersEngine

        loaded = AutoModelForCausalLM.from_pretrained(model).eval()
        return TransformersEngine(loaded, self.tokenizer, context_tokens=512, max_batch_size=8)

    def retire(self, engine: Any) -> None:
        self.retired.append(engine)
        engine.close()


async def test_a_worker_switches_to_a_promoted_model_between_batches_losing_no_job(
    redis: Any, make_settings: Any, tokenizer: Any, tmp_path: Path
) -> None:
    from core.conversation import ConversationKey
    from core.keys import Keys
    from core.training.registry import ModelRegistry, new_promotion
    from core.worker import Worker
    from tests.helpers import outbox, submit

    first, second = tmp_path / "first", tmp_path / "second"
    save_model(tiny_model(tokenizer, seed=0), tokenizer, first)
    save_model(tiny_model(tokenizer, seed=5), tokenizer, second)
    settings = make_settings(CHATBOT_MODEL=str(first))
    loader = TinyLoader(tokenizer)
    worker = Worker(redis, settings, await loader.load(str(first)), loader=loader, model=str(first))
    original = worker.engine
    await worker.queue.ensure_group()
    convs = [ConversationKey("test", "w", f"c{i}", "") for i in range(6)]
    for i, conv in enumerate(convs[:3]):
        await submit(redis, settings, conv, f"question {i}", f"m{i}")
    assert await worker.step(wait=False) == 3  # three replies in the making
    await ModelRegistry(redis, Keys(settings.namespace)).promote(
        new_promotion(second, {"perplexity": 1.0}, {}, forced=False)
    )
    for i, conv in enumerate(convs[3:], start=3):  # arrive while the switch waits
        await submit(redis, settings, conv, f"question {i}", f"m{i}")
    assert await worker.follow_promotions(now=True)
    assert len(await outbox(redis, settings)) == 3  # the batch in hand finished first
    assert worker.model == str(second) and worker.engine is not original
    assert loader.retired == [original]
    while await worker.step() > 0:
        pass
    replies = await outbox(redis, settings)
    assert sorted(r.conversation.channel for r in replies) == [f"c{i}" for i in range(6)]
    assert not await worker.follow_promotions(now=True)  # nothing new
    info = await redis.xpending(Keys(settings.namespace).jobs, "workers")
    assert int(info["pending"]) == 0
    worker.engine.close()


def test_training_resumes_from_its_last_checkpoint(tokenizer: Any, tmp_path: Path) -> None:
    train = rows([parse_dialogue(e, "x") for e in DIALOGUES], PERSONA)
    out = tmp_path / "model"
    first = train_sft(
        tiny_model(tokenizer), tokenizer, train, TrainOptions(out=out, batch_size=5, max_steps=3)
    )
    assert first.steps == 3 and list((out / "checkpoints").glob("checkpoint-3"))
    resumed = train_sft(
        tiny_model(tokenizer, seed=9),
        tokenizer,
        train,
        TrainOptions(out=out, batch_size=5, max_steps=5, resume=True),
    )
    # Continued at step 3 (not from scratch), with the checkpoint's weights.
    assert resumed.resumed_from_step == 3 and resumed.steps == 5
    assert json.loads((out / "training.json").read_text())["resumed_from_step"] == 3
