"""`bench decode`: greedy decoding (batch 1 by default) against transformers' generate, same weights."""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

from flaxformer_lite.bench.measure import interleaved_seconds, median_seconds
from flaxformer_lite.runtime.flags import positive_int


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """Model shape and workload of the decode benchmark."""
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--d-model", type=positive_int, default=256)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--vocab", type=positive_int, default=50257)
    parser.add_argument("--max-len", type=positive_int, default=1280,
                        help="n_positions; must fit the longest --positions prompt")
    parser.add_argument("--prompt-len", type=positive_int, default=16)
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="prompts decoded together (random, all --prompt-len long)")
    parser.add_argument("--new-tokens", type=positive_int, default=200)
    parser.add_argument("--positions", type=positive_int, nargs="*", default=[100, 1000],
                        help="prompt lengths at which to time single decode steps (none: skip)")
    parser.add_argument("--step-tokens", type=positive_int, default=32, help="steps timed at each of --positions")
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copy-mib", type=positive_int, default=256,
                        help="array size of the copy that measures memory bandwidth (bigger than the caches)")
    parser.add_argument("--profile", metavar="DIR",
                        help="also trace one generate call into DIR (TensorBoard/Perfetto) and print where "
                             "each token's time goes")
    parser.add_argument("--single-thread", action="store_true",
                        help="run the process on one CPU, torch with one thread: steadier figures on a shared, busy "
                             "machine, and op times in --profile that add up (Linux)")


def copy_bandwidth(mib: int, repeats: int = 5) -> float:
    """Bytes/s of a jitted elementwise pass over a float32 array of `mib` MiB (read + write), median.

    The pass updates its input in place (the buffer is donated): an out-of-place pass
    writes into a freshly allocated buffer each call, and the kernel's page faults on it,
    not the memory, then set the figure (3.2 against 22 GB/s at 256 MiB on the 2-core VM
    of BENCHMARKS.md).
    """
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**18,), jnp.float32)
    nbytes = x.nbytes
    touch = jax.jit(lambda a: a * 0.5 + 0.5, donate_argnums=0)  # stays 1.0: no overflow over many calls

    def one_pass():
        nonlocal x
        x = jax.block_until_ready(touch(x))

    one_pass()
    return 2 * nbytes / median_seconds(one_pass, repeats)


def weight_bytes_per_token(params) -> int:
    """Parameter bytes one batch-1 decode step reads: every weight once, but only one
    row of the position table (the tied token table is read whole by the LM head)."""
    import jax

    flat = jax.tree_util.tree_leaves_with_path(params)
    total = sum(x.nbytes for _, x in flat)
    for path, x in flat:
        if "position_embedding" in jax.tree_util.keystr(path):
            total -= x.nbytes - x.nbytes // x.shape[0]
    return int(total)


def run_decode(args: argparse.Namespace) -> dict:
    """Greedy decoding of --batch prompts (1 by default), here and in transformers, same weights, same process.

    The GPT-2 is random, built in transformers and loaded here through interop.hf. Both
    sides generate exactly the requested number of tokens (EOS ignored) with a KV cache.
    Per-token time at position p: (time(p-token prompt, 1 + k new) - time(p, 1 new)) / k,
    which leaves out the prefill.
    """
    import jax
    import numpy as np

    try:
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(f"bench decode compares against transformers (PyTorch): pip install -e '.[test]' ({e})")

    from flaxformer_lite.inference.decode import generate
    from flaxformer_lite.interop import hf
    from flaxformer_lite.models import build_model

    longest = max([args.prompt_len + args.new_tokens] + [p + 1 + args.step_tokens for p in args.positions])
    if longest > args.max_len:
        raise SystemExit(f"bench decode: --max-len {args.max_len} is below the longest sequence timed ({longest})")
    last = args.vocab - 1  # GPT-2's <|endoftext|> is the last id
    config = transformers.GPT2Config(
        vocab_size=args.vocab, n_positions=args.max_len, n_embd=args.d_model, n_layer=args.layers,
        n_head=args.heads, bos_token_id=last, eos_token_id=last, pad_token_id=last,
    )
    torch.manual_seed(args.seed)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        cfg, params = hf.load(folder)
    ours = build_model(cfg)
    rng = np.random.default_rng(args.seed)

    def run_ours(prompts, n):
        out = generate(ours, params, prompts, max_new_tokens=n, ignore_eos=True)
        return np.asarray(jax.block_until_ready(out.tokens))

    def run_theirs(prompts, n):
        ids = torch.tensor(prompts)
        greedy = transformers.GenerationConfig(
            max_new_tokens=n, do_sample=False, num_beams=1, use_cache=True, eos_token_id=None, pad_token_id=last
        )
        with torch.inference_mode():
            out = theirs.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
        return out[:, ids.shape[1]:].numpy()

    prompt = rng.integers(0, args.vocab - 1, (args.batch, args.prompt_len)).tolist()
    start = time.perf_counter()
    our_tokens = run_ours(prompt, args.new_tokens)
    first_call_s = time.perf_counter() - start
    their_tokens = run_theirs(prompt, args.new_tokens)  # warm-up
    rounds = interleaved_seconds(
        {"ours": lambda: run_ours(prompt, args.new_tokens), "transformers": lambda: run_theirs(prompt, args.new_tokens)},
        args.repeats,
    )
    our_s, their_s = statistics.median(rounds["ours"]), statistics.median(rounds["transformers"])
    profile = None
    if args.profile:
        from flaxformer_lite.bench.profile import decode_phase, profile_step

        # generate's jitted program, inlined into one whose HLO (and its JAX names) we hold.
        whole = jax.jit(lambda p: generate(ours, p, prompt, max_new_tokens=args.new_tokens, ignore_eos=True).tokens)
        compiled = whole.lower(params).compile()
        run_whole = lambda _: jax.block_until_ready(compiled(params))  # noqa: E731
        run_whole(0)
        profile = profile_step(compiled, run_whole, args.new_tokens, args.profile, phase=decode_phase, unit="token")

    # The LM head (one d_model row times the vocab x d_model table) is most of a step's
    # weight traffic at batch 1, and both frameworks run it as one matrix-vector product.
    # Its time bounds the speedup: no decode loop beats transformers' step / our head time.
    table = theirs.lm_head.weight.detach()
    row = torch.from_numpy(rng.standard_normal((1, args.d_model)).astype(np.float32))
    our_head = jax.jit(lambda x, e: x @ e.T)
    table_j, row_j = jax.numpy.asarray(table.numpy()), jax.numpy.asarray(row.numpy())
    jax.block_until_ready(our_head(row_j, table_j))
    with torch.inference_mode():
        lm_head_ms = {
            "ours": 1e3 * median_seconds(lambda: jax.block_until_ready(our_head(row_j, table_j)), 20 * args.repeats),
            "transformers": 1e3 * median_seconds(lambda: torch.nn.functional.linear(row, table), 20 * args.repeats),
        }

    per_token = {}
    for p in args.positions:
        long_prompt = rng.integers(0, args.vocab - 1, (args.batch, p)).tolist()
        calls = {}
        for name, fn in (("ours", run_ours), ("transformers", run_theirs)):
            fn(long_prompt, 1), fn(long_prompt, 1 + args.step_tokens)  # compile / warm up
            calls[(name, 1)] = functools.partial(fn, long_prompt, 1)
            calls[(name, 1 + args.step_tokens)] = functools.partial(fn, long_prompt, 1 + args.step_tokens)
        med = {key: statistics.median(ts) for key, ts in interleaved_seconds(calls, args.repeats).items()}
        per_token[p] = {
            name: 1e3 * (med[(name, 1 + args.step_tokens)] - med[(name, 1)]) / args.step_tokens
            for name in ("ours", "transformers")
        }

    # A step reads every weight once for its --batch tokens: batch * copy bandwidth /
    # weight bytes bounds tokens/s (for small batches, while weights dominate the traffic).
    bandwidth = copy_bandwidth(args.copy_mib)
    weights = weight_bytes_per_token(params)
    bound = args.batch * bandwidth / weights
    tokens = args.batch * args.new_tokens

    results = {
        "benchmark": "decode",
        "model": {"layers": args.layers, "d_model": args.d_model, "heads": args.heads, "vocab": args.vocab,
                  "max_len": args.max_len, "parameters": int(sum(x.size for x in jax.tree.leaves(params)))},
        "workload": {"batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "single_thread": args.single_thread},
        "ours": {"tokens_per_s": tokens / our_s, "seconds": our_s,
                 "first_call_s": first_call_s, "compile_s_approx": first_call_s - our_s},
        "transformers": {"tokens_per_s": tokens / their_s, "seconds": their_s,
                         "version": transformers.__version__, "torch": torch.__version__,
                         "torch_threads": torch.get_num_threads()},
        "speedup": their_s / our_s,
        # Each round's pair of runs, side by side: the spread of the ratio under this load.
        "speedup_rounds": [t / o for o, t in zip(rounds["ours"], rounds["transformers"])],
        "same_tokens": bool((our_tokens == their_tokens).all()),
        "per_token_ms": per_token,
        "lm_head_ms": lm_head_ms,
        "bandwidth_bound": {"copy_bytes_per_s": bandwidth, "weight_bytes_per_token": weights,
                            "tokens_per_s": bound, "ours_fraction": tokens / our_s / bound,
                            "transformers_fraction": tokens / their_s / bound},
        "jax": {"version": jax.__version__, "backend": jax.default_backend()},
        "profile": profile,
    }
    print(_decode_report(results))
    return results


def _decode_report(r: dict) -> str:
    m, w = r["model"], r["workload"]
    lines = [
        f"GPT-2 {m['layers']} layers, d_model {m['d_model']}, {m['heads']} heads, vocab {m['vocab']} "
        f"({m['parameters']:,} parameters); batch {w['batch']}, prompt {w['prompt_len']}, {w['new_tokens']} new tokens, "
        f"median of {w['repeats']} interleaved rounds; {r['jax']['backend']}{', one thread each' if w['single_thread'] else ''}",
        "",
        "| | tokens/s | seconds |",
        "|---|---|---|",
        f"| flaxformer_lite generate (jit) | {r['ours']['tokens_per_s']:.0f} | {r['ours']['seconds']:.3f} |",
        f"| transformers {r['transformers']['version']} generate (torch {r['transformers']['torch']}, "
        f"{r['transformers']['torch_threads']} threads) | {r['transformers']['tokens_per_s']:.0f} | {r['transformers']['seconds']:.3f} |",
        "",
        f"speedup {r['speedup']:.2f}x (rounds {min(r['speedup_rounds']):.2f}x to {max(r['speedup_rounds']):.2f}x); "
        f"same tokens: {'yes' if r['same_tokens'] else 'NO'}; "
        f"first call {r['ours']['first_call_s']:.2f} s (compile about {r['ours']['compile_s_approx']:.2f} s)",
    ]
    bb = r["bandwidth_bound"]
    step = "token" if w["batch"] == 1 else f"step ({w['batch']} tokens)"
    lines += [f"memory-bandwidth bound: {bb['weight_bytes_per_token'] / 2**20:.1f} MiB of weights per {step} at "
              f"{bb['copy_bytes_per_s'] / 1e9:.1f} GB/s (measured copy) = {bb['tokens_per_s']:.0f} tokens/s; "
              f"ours reaches {100 * bb['ours_fraction']:.0f}% of it, transformers {100 * bb['transformers_fraction']:.0f}%"]
    head = r["lm_head_ms"]
    if r["per_token_ms"]:
        lines += ["", f"| position | ours ms/{step} | transformers ms/{step} |", "|---|---|---|"]
        lines += [f"| {p} | {v['ours']:.2f} | {v['transformers']:.2f} |" for p, v in r["per_token_ms"].items()]
        lines += [f"| LM head alone | {head['ours']:.2f} | {head['transformers']:.2f} |"]
        p, v = next(iter(r["per_token_ms"].items()))
        lines += ["", f"speedup bound at position {p}: transformers' step / our LM head alone = "
                      f"{v['transformers'] / head['ours']:.2f}x"]
    else:
        lines += ["", f"LM head alone: ours {head['ours']:.2f} ms, transformers {head['transformers']:.2f} ms"]
    if r["profile"]:
        from flaxformer_lite.bench.profile import format_profile

        lines += format_profile(r["profile"])
    return "\n".join(lines)
