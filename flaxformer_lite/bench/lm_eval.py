"""`bench eval`: `eval --tasks` against lm-eval's own `hf` model on one local task, same folder.

A random Llama of SmolLM2-135M's shape (by default) is written as an HF folder with a
small BPE tokenizer, beside a multiple-choice task over random words; both harnesses run
the task in this process, in alternating rounds, timed end to end (task loading,
tokenizing, compiling ours, scoring). Their accuracies must agree.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

from flaxformer_lite.runtime.flags import positive_int

WORDS = "the a cat dog sun tree blue river stone light cold green bird sand house road".split()


def add_lm_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Model shape and workload."""
    parser.add_argument("--layers", type=positive_int, default=30)
    parser.add_argument("--d-model", type=positive_int, default=576)
    parser.add_argument("--heads", type=positive_int, default=9)
    parser.add_argument("--kv-heads", type=positive_int, default=3)
    parser.add_argument("--d-ff", type=positive_int, default=1536)
    parser.add_argument("--vocab", type=positive_int, default=49152)
    parser.add_argument("--docs", type=positive_int, default=100, help="documents of the task (4 choices each)")
    parser.add_argument("--question-words", type=positive_int, default=30)
    parser.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass, both sides")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def _write_folder(folder: pathlib.Path, args) -> None:
    import tokenizers as hf_tokenizers
    import torch
    import transformers

    from flaxformer_lite import data

    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf_tokenizers.decoders.ByteLevel()
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(data.builtin_documents()[:40], trainer=trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def _write_task(folder: pathlib.Path, args) -> None:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    folder.mkdir(parents=True)
    rows = [{"question": " ".join(rng.choice(WORDS, args.question_words)),
             "choices": [" " + " ".join(rng.choice(WORDS, 5)) for _ in range(4)], "answer": int(rng.integers(4))}
            for _ in range(args.docs)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n"
    )


def run_lm_eval(args: argparse.Namespace) -> dict:
    """Alternating rounds of `eval --tasks` (in-process) and lm-eval's hf model; seconds and accuracy."""
    import os

    import lm_eval
    from lm_eval.tasks import TaskManager

    from flaxformer_lite.train.commands import add_eval_arguments, run_eval

    def ours(argv):
        parser = argparse.ArgumentParser()
        add_eval_arguments(parser)
        return run_eval(parser.parse_args(argv))

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    seconds = {"ours": [], "lm_eval_hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        _write_folder(root / "model", args)
        _write_task(root / "tasks", args)
        for _ in range(args.rounds):
            start = time.perf_counter()
            status = ours(["--tasks", "bench_mc", "--include-path", str(root / "tasks"), "--hf",
                           str(root / "model"), "--batch-size", str(args.batch_size), "--output", str(root / "o.json")])
            seconds["ours"].append(time.perf_counter() - start)
            if status:
                raise SystemExit(f"bench eval: eval --tasks exited {status}")
            start = time.perf_counter()
            theirs = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": str(root / "model"), "dtype": "float32", "device": "cpu"},
                tasks=["bench_mc"], task_manager=TaskManager(include_path=str(root / "tasks")),
                batch_size=args.batch_size,
            )
            seconds["lm_eval_hf"].append(time.perf_counter() - start)
        ours = json.loads((root / "o.json").read_text())["results"]["bench_mc"]["acc,none"]
    acc = {"ours": ours, "lm_eval_hf": theirs["results"]["bench_mc"]["acc,none"]}
    best = {k: min(v) for k, v in seconds.items()}
    print(f"bench eval: {args.docs} documents x 4 choices, {args.layers} layers, d_model {args.d_model}, "
          f"vocab {args.vocab}, batch {args.batch_size}")
    for name, times in seconds.items():
        print(f"  {name:11s} seconds per round: {', '.join(f'{t:.1f}' for t in times)}; acc {acc[name]:.3f}")
    print(f"  ours / lm-eval hf (best rounds): {best['ours'] / best['lm_eval_hf']:.2f}x the time")
    return {"seconds": seconds, "acc": acc, "time_ratio": best["ours"] / best["lm_eval_hf"]}
