"""SFT and DPO: losses against NumPy references, packing isolation, a toy preference run."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxformer_lite as ffl
from flaxformer_lite.data import ByteTokenizer, make_dataset, sft_batch
from flaxformer_lite.data.finetune import Record
from flaxformer_lite.train import init_train_state, make_eval_step, make_optimizer, make_train_step
from flaxformer_lite.train.losses import dpo_sums, sequence_logps

T = 24


def _packed_rows(examples, T):
    """Hand-made packing: examples (ids, trained mask) placed one after another in one row."""
    row = {k: np.zeros((1, T), np.int32) for k in ("tokens", "loss_mask", "tokens_segment_ids", "tokens_positions")}
    at = 0
    for k, (ids, mask) in enumerate(examples, start=1):
        n = len(ids)
        row["tokens"][0, at:at + n] = ids
        row["loss_mask"][0, at:at + n] = mask
        row["tokens_segment_ids"][0, at:at + n] = k
        row["tokens_positions"][0, at:at + n] = np.arange(n)
        at += n
    return row


def _log_softmax64(logits):
    x = logits.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def sft_model(tiny):
    cfg = tiny("gpt_tiny", "data.objective=sft")
    return cfg, ffl.build_model(cfg.model), ffl.init_params(cfg.model, jax.random.key(0))


def _examples(rng):
    out = []
    for n, prompt in ((7, 3), (9, 4), (6, 2)):
        ids = rng.integers(4, 250, n)
        out.append((ids, np.arange(n) >= prompt))
    return out


def _per_example_nll(model, params, batch):
    logits = model.apply(params, batch["input_ids"], segment_ids=batch["segment_ids"],
                         positions=batch["positions"]).logits
    nll_BT = -np.take_along_axis(_log_softmax64(np.asarray(logits)), batch["labels"][..., None], -1)[..., 0]
    seg = batch["segment_ids"][0]
    return {k: float((nll_BT[0] * batch["weights"][0])[seg == k].sum()) for k in (1, 2, 3)}


def test_sft_loss_is_the_assistant_tokens_nll(sft_model):
    cfg, model, params = sft_model
    rng = np.random.default_rng(0)
    examples = _examples(rng)
    batch = sft_batch(_packed_rows(examples, T), pad_id=0)
    # NumPy reference: each example's next-token nll summed over the tokens that predict a
    # trained token, each example run alone (so nothing is shared across examples).
    total, count = 0.0, 0
    for ids, mask in examples:
        logits = model.apply(params, jnp.asarray(ids[None], jnp.int32)).logits
        logp = _log_softmax64(np.asarray(logits[0]))
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                total, count = total - logp[t, ids[t + 1]], count + 1
    sums = jax.jit(make_eval_step(model, cfg))(params, {k: jnp.asarray(v) for k, v in batch.items()})
    assert float(sums["weight_sum"]) == count == sum(int(m[1:].sum()) for _, m in examples)
    np.testing.assert_allclose(float(sums["loss_sum"]), total, rtol=2e-5)


def test_changing_one_packed_example_changes_no_other_examples_loss(sft_model):
    _, model, params = sft_model
    rng = np.random.default_rng(1)
    examples = _examples(rng)
    before = _per_example_nll(model, params, sft_batch(_packed_rows(examples, T), pad_id=0))
    ids, mask = examples[1]
    examples[1] = (rng.integers(4, 250, len(ids)), mask)
    after = _per_example_nll(model, params, sft_batch(_packed_rows(examples, T), pad_id=0))
    assert after[2] != before[2]
    assert after[1] == pytest.approx(before[1], rel=1e-6) and after[3] == pytest.approx(before[3], rel=1e-6)


def _dpo_reference64(logits, labels, weights, seg, ref, beta):
    """Loss sum and its gradient wrt the logits, in float64 NumPy (DPO, Rafailov et al. 2023)."""
    logp = _log_softmax64(logits)
    B, T, V = logits.shape
    token = np.take_along_axis(logp, labels[..., None], -1)[..., 0] * weights
    half = B // 2
    seqs = np.zeros((B, T + 1))
    for b in range(B):
        np.add.at(seqs[b], seg[b], token[b])
    pc, pr = seqs[:half, 1:], seqs[half:, 1:]
    rc, rr = ref[:half, 1:], ref[half:, 1:]
    margin = beta * ((pc - rc) - (pr - rr))
    present = np.zeros((half, T), bool)
    for b in range(half):
        present[b, np.unique(seg[b][seg[b] > 0]) - 1] = True
    loss = np.sum(np.log1p(np.exp(-margin)) * present)
    dmargin = -1.0 / (1.0 + np.exp(margin)) * present  # d softplus(-m) / dm
    dseq = np.concatenate([beta * dmargin, -beta * dmargin])  # d loss / d (chosen, rejected) seq logp
    dtoken = np.take_along_axis(np.pad(dseq, ((0, 0), (1, 0))), seg, -1) * weights
    onehot = np.eye(V)[labels]
    grad = dtoken[..., None] * (onehot - np.exp(logp))
    return loss, grad


def test_dpo_loss_and_gradient_match_a_float64_reference():
    rng = np.random.default_rng(2)
    B, T, V, beta = 4, 6, 5, 0.5  # rows 0-1 chosen, 2-3 rejected; two pairs in row 0
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    labels = rng.integers(0, V, (B, T)).astype(np.int32)
    seg = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]] * 2, np.int32)
    weights = ((seg > 0) * rng.integers(0, 2, (B, T)) + (np.arange(T) == 1)).astype(np.float32)
    ref = rng.normal(size=(B, T + 1)) * (np.arange(T + 1) > 0)

    def loss_fn(logits):
        logp, w = sequence_logps(logits, labels, weights, seg)
        sums = dpo_sums(logp[:2], logp[2:], ref[:2], ref[2:], (w[:2] > 0) & (w[2:] > 0), beta)
        return sums["loss_sum"], sums

    (loss, sums), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(logits))
    ref_loss, ref_grad = _dpo_reference64(logits, labels, weights, seg, ref, beta)
    assert float(sums["weight_sum"]) == 3
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, atol=1e-6)


def test_dpo_learns_a_toy_preference_within_a_few_dozen_steps(tiny):
    cfg = tiny("gpt_tiny", "data.objective=dpo", "train.learning_rate=3e-3", "train.warmup_steps=0",
               "train.num_steps=40", "train.dpo_beta=0.5")
    rng = np.random.default_rng(3)
    records = [Record(f"toy:{i}", {"prompt": f"{rng.integers(100)} + {rng.integers(100)} is",
                                   "chosen": " right", "rejected": " wrong"}) for i in range(64)]
    ds = iter(make_dataset("dpo", records, tokenizer=ByteTokenizer(), batch_size=8, seq_len=cfg.data.seq_len))
    model, optimizer = ffl.build_model(cfg.model), make_optimizer(cfg.train)
    state = init_train_state(ffl.init_params(cfg.model, jax.random.key(0)), optimizer, 0, reference=True)
    step = jax.jit(make_train_step(model, cfg, optimizer))
    accuracy, margins = [], []
    for _ in range(cfg.train.num_steps):
        state, sums = step(state, next(ds))
        accuracy.append(float(sums["correct_sum"] / sums["weight_sum"]))
        margins.append(float(sums["reward_margin_sum"]))
    assert margins[0] == 0.0  # the reference is a copy of the initial params: no margin yet
    assert np.mean(accuracy[-5:]) > 0.9, accuracy
    jax.tree.map(np.testing.assert_array_equal, state.ref_params, ffl.init_params(cfg.model, jax.random.key(0)))


def test_a_resumed_dpo_run_keeps_its_frozen_reference(tiny, tmp_path):
    from flaxformer_lite.runtime import checkpoint
    from flaxformer_lite.train import loop

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(f'{{"prompt": "q{i}", "chosen": "yes", "rejected": "no"}}\n' for i in range(40)))
    cfg = tiny("gpt_tiny", "data.objective=dpo", f"data.corpus={prefs}", "train.num_steps=4",
               "train.checkpoint_every=2", "train.eval_every=4", "train.log_every=2")
    loop.train(cfg, tmp_path / "run", stop_at=2)
    assert loop.train(cfg, tmp_path / "run", resume=True)["step"] == 4
    with checkpoint.manager(tmp_path / "run", read_only=True, best_metric=None) as mngr:
        _, before, _ = checkpoint.restore(mngr, 2)
        params, extra, _ = checkpoint.restore(mngr, 4)
    jax.tree.map(np.testing.assert_array_equal, extra["ref_params"], before["ref_params"])
    # The initial params (the run's jitted, sharded init rounds like this eager one to 1 ulp).
    initial = ffl.init_params(cfg.model, jax.random.key(cfg.train.seed))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), extra["ref_params"], initial)
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), params, initial)))


# ------------------------------------------------------------------ prepared sft/dpo stores


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """(folder with a chat template, sft JSONL, dpo JSONL): messages and plain strings mixed."""
    import json

    from hf_chat_folder import write_tokenizer

    root = tmp_path_factory.mktemp("chat")
    write_tokenizer(root / "tok")
    rng = np.random.default_rng(5)
    words = ["hello", "the answer", "what is", "forty two", "why", "because", "sky", "blue"]

    def say(n):
        return " ".join(rng.choice(words, n))

    sft, dpo = [], []
    for i in range(24):
        if i % 3:
            sft.append({"messages": [{"role": "user", "content": say(2)}, {"role": "assistant", "content": say(3)},
                                     {"role": "user", "content": say(1)}, {"role": "assistant", "content": say(2)}]})
        else:
            sft.append({"prompt": say(2), "completion": say(4)})
        prompt = [{"role": "user", "content": say(2)}] if i % 2 else say(2)
        dpo.append({"prompt": prompt, "chosen": say(2), "rejected": say(3)})
    for name, lines in (("sft.jsonl", sft), ("dpo.jsonl", dpo)):
        (root / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "tok", root / "sft.jsonl", root / "dpo.jsonl"


def _setups(tiny, objective, jsonl, datadir, folder):
    from flaxformer_lite.train import loop

    cfgs = [tiny("gpt_tiny", f"data.objective={objective}", f"data.corpus={corpus}", f"data.tokenizer={folder}",
                 "data.val_fraction=0.25", "data.split=hash", "data.seq_len=64", "model.max_len=64",
                 "data.batch_size=4")
            for corpus in (jsonl, datadir)]
    return [loop.prepare_data(cfg) for cfg in cfgs]


def _same_batches(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_a_prepared_store_gives_the_batches_and_loss_of_its_jsonl(tiny, chat_data, tmp_path, objective):
    from flaxformer_lite.data import PrepareOptions, Store, prepare
    from flaxformer_lite.train.step import loss_and_sums

    folder, sft_jsonl, dpo_jsonl = chat_data
    jsonl = sft_jsonl if objective == "sft" else dpo_jsonl
    datadir = prepare(jsonl, tmp_path / "store", PrepareOptions(tokenizer=str(folder), objective=objective,
                                                                  val_fraction=0.25, shard_tokens=400), progress=False)
    store = Store.open(datadir)
    assert store.manifest["objective"] == objective and len(store.manifest["shards"]) > 1
    assert store.manifest["chat_template"]["sha256"] == ffl.data.tokenizer_template(folder).sha256
    from_jsonl, from_store = _setups(tiny, objective, jsonl, datadir, folder)
    assert len(from_jsonl.eval_batches) == len(from_store.eval_batches)
    for a, b in zip(from_jsonl.eval_batches, from_store.eval_batches):
        _same_batches(a, b)
    train_a, train_b = iter(from_jsonl.train), iter(from_store.train)
    cfg = from_jsonl.cfg
    model, params = ffl.build_model(cfg.model), ffl.init_params(cfg.model, jax.random.key(1))
    for _ in range(3):
        a, b = next(train_a), next(train_b)
        _same_batches(a, b)
    assert a[f"{'chosen_' if objective == 'dpo' else ''}weights"].sum() > 0
    ref = ffl.init_params(cfg.model, jax.random.key(2))  # dpo's reference: another model, so the loss is not log 2
    losses = [loss_and_sums(model, cfg, params, batch, deterministic=True, rng=None, ref_params=ref)[0]
              for batch in (a, b)]
    assert float(losses[0]) == float(losses[1]) and np.isfinite(float(losses[0]))


def test_a_store_rendered_with_another_template_is_refused_in_one_line(tiny, chat_data, tmp_path, capsys):
    import shutil

    from flaxformer_lite import cli
    from flaxformer_lite.data import PrepareOptions, prepare

    folder, sft_jsonl, _ = chat_data
    datadir = prepare(sft_jsonl, tmp_path / "store", PrepareOptions(tokenizer=str(folder), objective="sft"),
                      progress=False)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "chat_template.jinja").write_text(ffl.data.tokenizer_template(folder).source.replace("helpful", "terse"))
    argv = ["train", "--config", "gpt_tiny", "--workdir", str(tmp_path / "run"), "--set", "data.objective=sft",
            f"data.corpus={datadir}", f"data.tokenizer={other}", "train.num_steps=1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"{datadir}/manifest.json: rendered with chat template sha256 " in err and "data.tokenizer's folder" in err
    assert not (tmp_path / "run").exists()
    # The objective is checked too: an sft store is not a causal_lm corpus.
    argv[argv.index("data.objective=sft")] = "data.objective=causal_lm"
    argv[argv.index(f"data.tokenizer={other}")] = f"data.tokenizer={folder}"
    assert cli.main(argv) == 2
    assert "the store holds sft examples, not what data.objective=causal_lm reads" in capsys.readouterr().err


def test_prepare_cli_writes_a_dpo_store_whose_pairs_read_back(chat_data, tmp_path, capsys):
    from flaxformer_lite import cli
    from flaxformer_lite.data import Store, load_corpus, load_tokenizer
    from flaxformer_lite.data.finetune import dpo_tokens

    folder, _, dpo_jsonl = chat_data
    out = tmp_path / "dpo"
    assert cli.main(["prepare", "--corpus", str(dpo_jsonl), "--out", str(out), "--tokenizer", str(folder),
                     "--objective", "dpo", "--val-fraction", "0", "--no-progress"]) == 0
    docs = Store.open(out).documents("all")
    tok, template = load_tokenizer(str(folder)), ffl.data.tokenizer_template(folder)
    records = load_corpus("dpo", dpo_jsonl)
    from flaxformer_lite.data.objectives import _StoredExamples

    stored = _StoredExamples(docs, 10_000, dpo=True)
    assert len(stored) == len(records)
    for record, pair in zip(records, stored):
        for got, want in zip(pair, dpo_tokens(record, tok, template)):
            np.testing.assert_array_equal(got, want)
