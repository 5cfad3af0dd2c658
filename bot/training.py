"""`chatbot train sft|kto|dpo`, `chatbot data export` and `chatbot model` (`core.training`);

Both load a model of their own (the serving one is never touched): `--base`/`--model` name
it like CHATBOT_MODEL does (empty: the bundled SmolLM2); the output of `train` is a model
directory that CHATBOT_MODEL loads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bot.evaluation import (
    add_knowledge_arguments,
    cmd_eval,
    dialogue_files,
    evaluate_model,
    knowledge_set,
    print_figures,
    progress,
)
from core.errors import DataError
from core.settings import Settings


def _serving_location(settings: Settings) -> Path:
    from core.generation.model_files import prepare_model

    return Path(prepare_model(settings.model, settings.cache_dir, progress)[1]).resolve()


async def cmd_train_sft(settings: Settings, args: argparse.Namespace) -> int:
    from core.training.data import load_dialogues, rows
    from core.training.sft import train_sft

    dialogues = load_dialogues(args.data)
    train_rows = rows(dialogues, settings.persona)
    model, tokenizer, options = await _start_training(settings, args)
    print(
        f"training on {len(train_rows)} assistant turns of {len(dialogues)} dialogues",
        file=sys.stderr,
    )
    result = await asyncio.to_thread(train_sft, model, tokenizer, train_rows, options)
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s "
        f"(loss {result.first_loss:.3f} -> {result.last_loss:.3f}); "
        f"serve it with CHATBOT_MODEL={result.out}"
    )
    return 0


async def _start_training(settings: Settings, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, TrainOptions) for a `train` command: its output checked, its
    base model (`--base`, else CHATBOT_MODEL) loaded in float32."""
    from core.generation.model_files import load_model
    from core.training.sft import TrainOptions

    out = _checked_out(settings, args)
    base = settings.model if args.base is None else args.base
    model, tokenizer, _device = await asyncio.to_thread(
        load_model, base, settings.device, "float32", settings.cache_dir, progress
    )
    options = TrainOptions(
        out=out,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        lora=args.lora,
        resume=args.resume,
        max_steps=args.max_steps,
    )
    return model, tokenizer, options


async def _exported(settings: Settings, kind: str) -> list[dict[str, Any]]:
    from bot.admin import admin_redis
    from core.keys import Keys
    from core.store import ConversationStore
    from core.training.export import export

    async with admin_redis(settings) as redis:
        store = ConversationStore.from_settings(redis, settings)
        return await export(redis, Keys(settings.namespace), store, kind)  # type: ignore[arg-type]


async def cmd_data_export(settings: Settings, args: argparse.Namespace) -> int:
    rows = await _exported(settings, args.kind)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.out:
        args.out.write_text(lines, encoding="utf-8")
        print(f"{len(rows)} {args.kind} rows written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: entry {number}: not valid JSON ({exc.msg})") from None
    return rows


async def cmd_train_preference(settings: Settings, args: argparse.Namespace) -> int:
    from core.training.preference import train_preference

    method = args.train_command
    if args.data:
        rows, where = _read_rows(args.data), str(args.data)
    else:
        rows, where = await _exported(settings, method), f"what Redis holds ({method})"
    model, tokenizer, options = await _start_training(settings, args)
    print(f"training {method.upper()} on {len(rows)} rows from {where}", file=sys.stderr)
    result = await asyncio.to_thread(
        train_preference, method, model, tokenizer, rows, settings.persona, options, where
    )
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s; "
        f"serve it with CHATBOT_MODEL={result.out}"
    )
    return 0


def _checked_out(settings: Settings, args: argparse.Namespace) -> Path:
    out: Path = args.out.resolve()
    if out == _serving_location(settings):
        raise DataError(f"--out {args.out} is the model the workers serve: write elsewhere")
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise DataError(f"--out {args.out} is not empty: pick a new directory or pass --resume")
    return out


async def cmd_model_promote(settings: Settings, args: argparse.Namespace) -> int:
    import logging

    from bot.admin import admin_redis
    from core.keys import Keys
    from core.training.kb_eval import knowledge_regressions
    from core.training.registry import ModelRegistry, new_promotion, regressions, weights_digest

    candidate = args.directory.resolve()
    if not (candidate / "config.json").is_file():
        raise DataError(f"{args.directory}: not a model directory (no config.json)")
    weights_digest(candidate)  # a directory without weights fails here, before evaluating
    data = dialogue_files(args)
    knowledge = knowledge_set(args)
    async with admin_redis(settings) as redis:
        registry = ModelRegistry(redis, Keys(settings.namespace))
        serving = await registry.current()
        serving_spec = serving.path if serving else settings.model
        print(f"evaluating the serving model ({serving_spec or 'bundled'})…", file=sys.stderr)
        baseline = await evaluate_model(settings, serving_spec, data, knowledge)
        print(f"evaluating the candidate ({candidate})…", file=sys.stderr)
        metrics = await evaluate_model(settings, str(candidate), data, knowledge)
        for name, figures in (("serving", baseline), ("candidate", metrics)):
            print_figures(f"{name:>9}", figures)
        worse = regressions(metrics, baseline)
        if knowledge is not None:
            worse += knowledge_regressions(metrics["knowledge"], baseline["knowledge"])
        if worse and not args.force:
            print("refused: the candidate is worse: " + "; ".join(worse), file=sys.stderr)
            return 2
        if worse:
            logging.getLogger("chatbot").warning(
                "promoting %s with --force although it is worse: %s", candidate, "; ".join(worse)
            )
        promotion = new_promotion(candidate, metrics, baseline, forced=bool(worse))
        await registry.promote(promotion)
    print(f"promoted {candidate}: running workers switch to it after the replies in hand")
    return 0


async def cmd_model_rollback(settings: Settings, args: argparse.Namespace) -> int:
    from bot.admin import admin_redis
    from core.keys import Keys
    from core.training.registry import ModelRegistry

    async with admin_redis(settings) as redis:
        now = await ModelRegistry(redis, Keys(settings.namespace)).rollback()
    print(f"rolled back: workers now serve {now.path if now else settings.model or 'bundled'}")
    return 0


async def cmd_model_list(settings: Settings, args: argparse.Namespace) -> int:
    import datetime

    from bot.admin import admin_redis
    from core.health import check_health
    from core.keys import Keys
    from core.training.registry import ModelRegistry

    async with admin_redis(settings) as redis:
        live, retired = await ModelRegistry(redis, Keys(settings.namespace)).history()
        health = await check_health(redis, Keys(settings.namespace))
    default = settings.model or "bundled SmolLM2-135M-Instruct"
    print(f"serving: {live[0].path if live else default + ' (CHATBOT_MODEL)'}")
    for label, promotions in (("promoted", live), ("rolled back", retired)):
        for p in promotions:
            when = datetime.datetime.fromtimestamp(p.at).isoformat(timespec="seconds")
            m = p.metrics
            print(
                f"  {label:<11} {when} {p.path} sha256:{p.digest[:12]} by {p.by}"
                f"{' (forced)' if p.forced else ''}: perplexity {m.get('perplexity')}, "
                f"BLEU {m.get('bleu')}, chrF {m.get('chrf')}"
            )
    for worker in health.workers:
        print(f"  worker {worker.get('consumer')}: {worker.get('model', '?')}")
    return 0


def add_training_commands(sub: Any) -> None:
    """`chatbot train`, `data`, `model` and `eval`."""
    _add_train_commands(sub)
    _add_service_commands(sub)


def _add_train_commands(sub: Any) -> None:
    train = sub.add_parser("train", help="fine-tune the chat model").add_subparsers(
        dest="train_command", required=True, metavar="METHOD"
    )
    methods = {
        "sft": ("supervised fine-tuning on dialogue files (loss on assistant turns only)", 5e-5),
        "kto": ("KTO on rated answers (from Redis, or --data FILE of kto rows)", 5e-6),
        "dpo": ("DPO on answers agents corrected (from Redis, or --data FILE)", 5e-6),
    }
    for name, (help_text, learning_rate) in methods.items():
        method = train.add_parser(name, help=help_text, description=help_text)
        if name == "sft":
            method.add_argument("--data", type=Path, nargs="+", required=True, metavar="FILE")
        else:
            method.add_argument("--data", type=Path, default=None, metavar="FILE")
        method.add_argument("--out", type=Path, required=True, metavar="DIR")
        method.add_argument("--base", default=None, metavar="MODEL", help="default: CHATBOT_MODEL")
        method.add_argument("--epochs", type=float, default=3.0 if name == "sft" else 1.0)
        method.add_argument("--learning-rate", type=float, default=learning_rate)
        method.add_argument("--batch-size", type=int, default=4)
        method.add_argument("--max-steps", type=int, default=-1, help="stop after N steps")
        method.add_argument("--lora", action="store_true", help="train a LoRA adapter, merge it")
        method.add_argument("--resume", action="store_true", help="continue from a checkpoint")
        method.set_defaults(handler=cmd_train_sft if name == "sft" else cmd_train_preference)


def _add_service_commands(sub: Any) -> None:
    """`chatbot data export`, `model list|promote|rollback` and `eval`: about the data and
    the models of the running service."""
    data = sub.add_parser("data", help="training data from the service").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    help_text = "export conversations (sft), rated answers (kto) or corrections (dpo) as JSONL"
    exporting = data.add_parser("export", help=help_text, description=help_text)
    exporting.add_argument("--kind", choices=["sft", "kto", "dpo"], required=True)
    exporting.add_argument("--out", type=Path, default=None, metavar="FILE")
    exporting.set_defaults(handler=cmd_data_export)

    model = sub.add_parser("model", help="which model the workers serve").add_subparsers(
        dest="model_command", required=True, metavar="ACTION"
    )
    help_text = "the promoted models, the one served, and what each worker serves"
    model.add_parser("list", help=help_text, description=help_text).set_defaults(
        handler=cmd_model_list
    )
    help_text = "evaluate DIR against the serving model; serve it unless it is worse"
    promote = model.add_parser("promote", help=help_text, description=help_text)
    promote.add_argument("directory", type=Path, metavar="DIR")
    promote.add_argument("--data", type=Path, nargs="+", default=None, metavar="FILE")
    promote.add_argument("--force", action="store_true", help="promote even if it is worse")
    add_knowledge_arguments(promote)
    promote.set_defaults(handler=cmd_model_promote)
    help_text = "serve the model promoted before the current one (or CHATBOT_MODEL)"
    model.add_parser("rollback", help=help_text, description=help_text).set_defaults(
        handler=cmd_model_rollback
    )

    help_text = "perplexity on assistant turns, BLEU and chrF of generated replies"
    ev = sub.add_parser("eval", help=help_text, description=help_text)
    ev.add_argument("--data", type=Path, nargs="+", default=None, metavar="FILE")
    ev.add_argument("--model", default=None, metavar="MODEL", help="default: CHATBOT_MODEL")
    ev.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"))
    ev.add_argument("--json", type=Path, default=None, metavar="OUT")
    add_knowledge_arguments(ev)
    ev.set_defaults(handler=cmd_eval)
