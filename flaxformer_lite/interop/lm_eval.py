"""lm-evaluation-harness on our models: an lm-eval `LM` over functions the caller gives.

    lm = HarnessLM(encode, decode, score=scorer, generate=generate_fn, eot_id=2, prefix_id=1, max_length=2048)
    results = evaluate(lm, ["hellaswag"], include_path=None, num_fewshot=0, limit=100)
    print(table(results))

This module is the only one that knows lm-eval's names. It turns lm-eval's requests into
token ids exactly as lm-eval's own HF backend does (TemplateLM: trailing spaces of a
context move to the continuation, the pair is encoded whole and split at the context's
length, an empty context conditions on the prefix token; rolling log-likelihoods go
through lm-eval's own disjoint windows), so the same checkpoint scores the same here and
under `lm_eval --model hf`. The caller supplies the model side: `score` (pairs of id lists
-> (sum of log-probs, greedy?)) and `generate` (greedy continuations with stop strings);
inference/evaluation.py wires them to the Scorer and the serving engine.

lm-eval is an install extra: `pip install 'flaxformer_lite[eval]'`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from flaxformer_lite.config import ConfigError

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
except ImportError as e:  # the extra is not installed: one line naming the fix
    raise ConfigError("eval --tasks runs lm-evaluation-harness, which is not installed: "
                      "pip install 'flaxformer_lite[eval]' (or pip install lm-eval)") from e

Pairs = Sequence[tuple[list[int], list[int]]]
# (prompt ids, stop strings, most new tokens) -> the generated text, cut before a stop string
GenerateFn = Callable[[Sequence[tuple[list[int], list[str], int]]], list[str]]


class HarnessLM(TemplateLM):
    """An lm-eval language model whose tokenizer and model are plain functions.

    Args:
      encode: (text, add_special_tokens) -> ids, as transformers' tokenizer.encode (True
        applies the tokenizer's post-processor, BOS where it adds one).
      decode: ids -> text.
      score: pairs (context ids, continuation ids) -> [(sum log p, every token greedy)].
      generate: requests (prompt ids, stop strings, max new tokens) -> texts.
      eot_id: the end-of-text id (lm-eval's eot_token_id: the tokenizer's eos).
      prefix_id: the id an empty context conditions on (the bos id, else eos, as lm-eval's HF backend).
      max_length: the longest input in tokens.
      max_gen_toks: new tokens when a task does not say.
    """

    def __init__(self, encode: Callable[[str, bool], list[int]], decode: Callable[[Sequence[int]], str], *,
                 score: Callable[[Pairs], list], generate: GenerateFn, eot_id: int, prefix_id: int,
                 max_length: int, max_gen_toks: int = 256):
        super().__init__()
        self._encode, self._decode, self._score, self._generate = encode, decode, score, generate
        self._eot_id, self._prefix_id = eot_id, prefix_id
        self.max_length, self.max_gen_toks = max_length, max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        # transformers adds the post-processor's specials unless told not to; a text that
        # already starts with the prefix token's text is not given a second one (lm-eval).
        add = add_special_tokens if add_special_tokens is not None else (
            not string.startswith(self._decode([self._prefix_id])))
        return self._encode(string, add)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(list(context), list(continuation)) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for window in lm_eval.utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            ):
                windows.append((None, *lm_eval.utils.make_disjoint_window(window)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self._decode([self._eot_id])
        batch = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ConfigError("eval --tasks decodes greedily; this task asks for sampling (do_sample: true)")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            max_new = int(kwargs["max_gen_toks"])
            if max_new >= self.max_length:
                raise ConfigError(f"the task asks for {max_new} new tokens and the model's context is "
                                  f"{self.max_length}: set max_gen_toks lower in its generation_kwargs")
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            batch.append((ids, until, max_new))
        texts = self._generate(batch)
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts


def evaluate(lm: HarnessLM, tasks: Sequence[str], *, include_path: Optional[str] = None,
             num_fewshot: Optional[int] = None, limit: Optional[float] = None, seed: int = 0) -> dict:
    """lm-eval's results dict (per-task metrics under "results", per-document records under "samples")."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or in {include_path}" if include_path else " (add --include-path DIR for your own YAML tasks)"
        raise ConfigError(f"--tasks: lm-eval knows no task {', '.join(map(repr, unknown))}{where}")
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def table(results: dict) -> str:
    """lm-eval's own markdown table of the metrics."""
    return lm_eval.utils.make_table(results)
