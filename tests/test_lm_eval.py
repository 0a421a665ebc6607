"""`eval --tasks`: lm-eval tasks on our model give lm-eval's own `hf` model's numbers.

One tiny random Llama folder, three local tasks (multiple choice, rolling log-likelihood,
generation until a stop string) over JSONL files written here, run by our command and by
lm-eval's HFLM on the same folder in float32.
"""

import json

import lm_eval
import numpy as np
import pytest
from hf_chat_folder import write_llama_chat_folder
from lm_eval.tasks import TaskManager

from flaxformer_lite import data
from flaxformer_lite.cli import main
from flaxformer_lite.inference.scoring import Scorer, plan_lengths
from flaxformer_lite.interop import hf
from flaxformer_lite.models import build_model

WORDS = ["cat", "dog", "sun", "tree", "blue", "river", "stone", "light", "cold", "green", "bird", "sand"]
TASKS = {
    "tiny_mc": """
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "tiny_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "tiny_gen": """
output_type: generate_until
doc_to_text: "Say: {{question}}\\n"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def _write_tasks(folder, rng):
    folder.mkdir()
    docs = []
    for _ in range(10):
        question = " ".join(rng.choice(WORDS, int(rng.integers(2, 6))))
        choices = [" " + " ".join(rng.choice(WORDS, int(rng.integers(1, 4)))) for _ in range(4)]
        # Long enough that the rolling task needs two windows of the 128-token context.
        text = " ".join(rng.choice(WORDS, int(rng.integers(20, 90))))
        docs.append({"question": question, "choices": choices, "answer": int(rng.integers(4)), "text": text})
    corpus = folder / "docs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, body in TASKS.items():
        header = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {corpus}\n"
                  "test_split: test\n")
        (folder / f"{name}.yaml").write_text(header + body)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    write_llama_chat_folder(root / "model", seed=3)
    _write_tasks(root / "tasks", np.random.default_rng(7))
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch, setup):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(setup / "datasets_cache"))


@pytest.fixture(scope="module")
def theirs(setup):
    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(setup / "model"), "dtype": "float32", "device": "cpu"},
        tasks=list(TASKS), task_manager=TaskManager(include_path=str(setup / "tasks")), batch_size=4,
        log_samples=True,
    )


def _per_doc(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_scores_and_generations_equal_lm_evals_hf_model(setup, theirs):
    out = setup / "ours.json"
    assert main(["eval", "--tasks", ",".join(TASKS), "--include-path", str(setup / "tasks"),
                 "--hf", str(setup / "model"), "--output", str(out), "--batch-size", "3"]) == 0
    ours = json.loads(out.read_text())
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == pytest.approx(theirs["results"]["tiny_mc"][metric], abs=1e-9)
    mine, hf = _per_doc(ours, "tiny_mc"), _per_doc(theirs, "tiny_mc")
    assert len(mine) == len(hf) == 10
    for a, b in zip(mine, hf):
        got = [float(r[0][0]) for r in a["resps"]]
        want = [float(r[0][0]) for r in b["resps"]]
        np.testing.assert_allclose(got, want, atol=1e-4)  # every choice's log-likelihood
        assert [bool(r[0][1]) for r in a["resps"]] == [bool(r[0][1]) for r in b["resps"]]
    for a, b in zip(_per_doc(ours, "tiny_rolling"), _per_doc(theirs, "tiny_rolling")):
        np.testing.assert_allclose(float(a["resps"][0][0]), float(b["resps"][0][0]), atol=1e-4)
    ppl = "word_perplexity,none"
    assert ours["results"]["tiny_rolling"][ppl] == pytest.approx(theirs["results"]["tiny_rolling"][ppl], rel=1e-4)
    generated = [a["filtered_resps"][0] for a in _per_doc(ours, "tiny_gen")]
    assert generated == [b["filtered_resps"][0] for b in _per_doc(theirs, "tiny_gen")]
    assert any(generated)  # the model says something: the comparison is not of empty strings


def test_a_score_does_not_depend_on_how_it_is_split_or_padded(setup):
    """A continuation scored whole equals its two halves scored in other rows and buckets."""
    cfg, params = hf.load(setup / "model")
    scorer = Scorer(build_model(cfg), params, batch_size=2)
    tok = data.load_tokenizer(str(setup / "model"))
    ids = tok.encode(" ".join(["river stone"] * 80))
    assert len(ids) > cfg.max_len
    whole = scorer([([tok.eos_id], ids[: cfg.max_len])])[0][0]
    halves = scorer([([tok.eos_id], ids[:40]), ([tok.eos_id, *ids[:40]], ids[40: cfg.max_len])])
    assert whole == pytest.approx(halves[0][0] + halves[1][0], abs=1e-4)


def test_bad_task_requests_are_one_line_errors(setup, capsys):
    assert main(["eval", "--tasks", "no_such_task", "--include-path", str(setup / "tasks"),
                 "--hf", str(setup / "model")]) == 2
    assert "knows no task 'no_such_task'" in capsys.readouterr().err
    assert main(["eval", "--tasks", "tiny_mc", "--hf", str(setup / "model"), "--workdir", str(setup)]) == 2
    assert "pass one model" in capsys.readouterr().err
    assert main(["eval", "--hf", str(setup / "model")]) == 2
    assert "go with --tasks" in capsys.readouterr().err


def test_length_plan_is_the_cheapest_set_of_programs():
    """Each batch pads to its own bucket or a longer one of the call; the plan's cost (one
    compile per length plus the padded row-tokens) is the least of all subsets, by brute force."""
    import itertools

    rng = np.random.default_rng(3)
    for compile_cost in (0, 300, 5000):
        buckets = [int(b) for b in rng.choice([16, 18, 20, 24, 28, 32, 40], int(rng.integers(1, 12)))]
        plan = plan_lengths(buckets, rows=4, compile_cost=compile_cost)
        assert all(p >= b and p in buckets for p, b in zip(plan, buckets))

        def cost(chosen):
            return compile_cost * len(chosen) + 4 * sum(min(c for c in chosen if c >= b) for b in buckets)

        others = sorted(set(buckets) - {max(buckets)})
        subsets = [{max(buckets), *extra} for n in range(len(others) + 1) for extra in itertools.combinations(others, n)]
        assert cost(set(plan)) == min(map(cost, subsets))
    assert plan_lengths([32, 24, 16], rows=8, compile_cost=0) == [32, 24, 16]
    assert plan_lengths([32, 24, 16], rows=8, compile_cost=10_000) == [32, 32, 32]


@pytest.mark.parametrize("preset", ["llama3_tiny", "gemma2_tiny"])  # gemma2: softcapped logits, every position
def test_scores_equal_log_softmax_of_the_full_forward_pass(preset):
    import jax

    import flaxformer_lite as ffl

    cfg = ffl.load_config(preset).model
    params = ffl.init_params(cfg, jax.random.key(1))
    model = build_model(cfg)
    rng = np.random.default_rng(2)
    pairs = [(list(rng.integers(3, cfg.vocab_size, n)), list(rng.integers(3, cfg.vocab_size, k)))
             for n, k in ((5, 1), (17, 3), (9, 6), (30, 2), (1, 9))]
    # Pairs with the same inputs share a forward row: one-token choices of one context,
    # and a two-token continuation whose first token ends another pair's context.
    shared, (a, b) = pairs[3][0], rng.integers(3, cfg.vocab_size, 2)
    pairs += [(shared, [int(t)]) for t in rng.integers(3, cfg.vocab_size, 3)]
    pairs += [(shared, [int(a), int(b)]), (shared + [int(a)], [int(rng.integers(3, cfg.vocab_size))])]
    got = Scorer(model, params, batch_size=2)(pairs)
    # The reference: one forward pass over every pair, right-padded (a causal model's
    # logits at a position do not depend on the tokens after it).
    width = max(len(c) + len(k) for c, k in pairs)
    ids = np.asarray([c + k + [3] * (width - len(c) - len(k)) for c, k in pairs])
    logp_all = jax.nn.log_softmax(jax.jit(model.apply)(params, ids).logits.astype(np.float32), axis=-1)
    for (context, continuation), (logprob, greedy), logp in zip(pairs, got, logp_all):
        rows = logp[len(context) - 1:len(context) + len(continuation) - 1]
        want = sum(float(rows[j, t]) for j, t in enumerate(continuation))
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(np.argmax(rows[j])) == t for j, t in enumerate(continuation))


def test_bench_eval_times_both_harnesses_and_their_accuracies_agree(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "eval", "--layers", "1", "--d-model", "32", "--heads", "2", "--kv-heads", "1",
                 "--d-ff", "64", "--vocab", "512", "--docs", "6", "--rounds", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["acc"]["ours"] == result["acc"]["lm_eval_hf"]
    assert all(t > 0 for times in result["seconds"].values() for t in times)
    assert "ours / lm-eval hf" in capsys.readouterr().out
