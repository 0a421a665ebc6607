"""lm-eval tasks on a loaded model: `flaxformer-lite eval --tasks ...` (train/commands.py).

    results = run_tasks(model_cfg, params, tokenizer, folder, ["arc_easy"], limit=100)

Log-likelihoods come from `scoring.Scorer` (one forward pass per batch of requests);
`generate_until` requests go through the serving engine (`engine.Engine`: continuous
batching, greedy, the task's stop strings), compiled only when a task generates. Text
is encoded by the folder's tokenizer.json exactly as transformers encodes it, so the
token ids are those of `lm_eval --model hf` on the same folder.
"""

from __future__ import annotations

import pathlib
import threading
from typing import Optional, Sequence

from flaxformer_lite.config import ConfigError
from flaxformer_lite.inference.engine import Engine, SamplingParams
from flaxformer_lite.inference.scoring import Scorer
from flaxformer_lite.models import build_model


def _text_functions(tokenizer, folder: Optional[pathlib.Path]):
    """(encode(text, add_special_tokens), decode(ids)) as transformers' tokenizer does them."""
    tokenizer_file = folder / "tokenizer.json" if folder is not None else None
    if tokenizer_file is not None and tokenizer_file.is_file():
        import tokenizers

        rust = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        return (lambda text, add: rust.encode(text, add_special_tokens=add).ids,
                lambda ids: rust.decode(list(ids), skip_special_tokens=False))
    # A run's own tokenizer (bytes, or a tokenizer.json named by path): its plain encoding.
    return lambda text, add: tokenizer.encode(text, special=True), tokenizer.decode


def _engine_generate(model, params, tokenizer, *, max_len: int, max_batch: int):
    """generate(requests) for lm-eval: every request in an engine started for the call."""

    def generate(requests: Sequence[tuple[list[int], list[str], int]]) -> list[str]:
        engine = Engine(model, params, tokenizer, max_batch=max_batch, max_len=max_len, max_queue=len(requests))
        engine.start()
        finished = [threading.Event() for _ in requests]
        events: list = [None] * len(requests)
        try:
            for i, (ids, stops, max_new) in enumerate(requests):
                def sink(event, i=i):
                    if event["type"] == "done":
                        events[i] = event
                        finished[i].set()

                engine.submit(ids, SamplingParams(max_tokens=max_new, temperature=0.0, stop=tuple(stops)), sink)
            for event in finished:
                event.wait()
        finally:
            engine.stop()
        failed = [e for e in events if e["finish_reason"] == "error"]
        if failed:
            raise RuntimeError(f"generation failed: {failed[0]['error']}")
        return [e["text"] for e in events]

    return generate


def run_tasks(model_cfg, params, tokenizer, folder: Optional[pathlib.Path], tasks: Sequence[str], *,
              include_path: Optional[str] = None, num_fewshot: Optional[int] = None,
              limit: Optional[float] = None, batch_size: int = 8, seed: int = 0) -> dict:
    """Run lm-eval `tasks` on the model; returns lm-eval's results dict."""
    from flaxformer_lite.data import bos_or_none
    from flaxformer_lite.interop import lm_eval

    if model_cfg.family != "decoder":
        raise ConfigError(f"eval --tasks runs decoder-only models; this one has model.family={model_cfg.family!r}")
    model = build_model(model_cfg)
    encode, decode = _text_functions(tokenizer, folder)
    bos = bos_or_none(tokenizer)
    lm = lm_eval.HarnessLM(
        encode, decode,
        score=Scorer(model, params, max_len=model_cfg.max_len, batch_size=batch_size),
        generate=_engine_generate(model, params, tokenizer, max_len=model_cfg.max_len, max_batch=batch_size),
        eot_id=tokenizer.eos_id, prefix_id=tokenizer.eos_id if bos is None else bos, max_length=model_cfg.max_len,
    )
    return lm_eval.evaluate(lm, tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit, seed=seed)
