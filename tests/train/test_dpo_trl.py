"""DPO's loss and log-probabilities against TRL's DPOTrainer on a tiny Llama.

TRL (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss) sums each completion's token
log-probs (`per_token_logps.sum(dim=1)`), takes chosen minus rejected log-ratio against
the reference and, for loss_type "sigmoid", `-F.logsigmoid(self.beta * delta_score)`,
averaged over the batch; its DataCollatorForPreference masks the prompt out. One pair a
batch here, so its mean is the pair's own loss.
"""


import datasets
import jax
import numpy as np
import pytest
import transformers
import trl

import flaxformer_lite as ffl
from flaxformer_lite.config import Config, DataConfig, TrainConfig
from flaxformer_lite.data import dpo_batch, load_tokenizer, tokenizer_template
from flaxformer_lite.data.finetune import Record, dpo_tokens
from flaxformer_lite.train.step import loss_and_sums
from hf_chat_folder import write_llama_chat_folder

BETA = 0.1
T = 96


def _pairs():
    rng = np.random.default_rng(0)
    words = ["sky", "blue", "forty", "two", "because", "the answer", "is", "no"]
    return [{"prompt": [{"role": "user", "content": f"what is {i} plus {rng.integers(9)}?"}],
             "chosen": [{"role": "assistant", "content": " ".join(rng.choice(words, 2))}],
             "rejected": [{"role": "assistant", "content": " ".join(rng.choice(words, 4))}]} for i in range(3)]


@pytest.fixture(scope="module")
def trl_pairs(tmp_path_factory):
    """[(pair, TRL's tokens, loss, chosen logp, rejected logp)] of a policy and another reference."""
    root = tmp_path_factory.mktemp("trl")
    policy, reference = write_llama_chat_folder(root / "policy", seed=0), write_llama_chat_folder(root / "ref", seed=1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "policy")
    pairs = _pairs()
    # bf16=False: DPOConfig defaults to bf16, under which accelerate runs the reference in autocast.
    args = trl.DPOConfig(output_dir=str(root / "out"), beta=BETA, loss_type=["sigmoid"], report_to=[], use_cpu=True, bf16=False,
                         per_device_train_batch_size=1)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(pairs))
    policy.eval()  # no dropout (the tiny Llama has none; this also keeps TRL's metrics under "eval")
    out = []
    for i, pair in enumerate(pairs):
        example = trainer.train_dataset[i]
        trainer._metrics["eval"].clear()
        loss = float(trainer.compute_loss(policy, trainer.data_collator([example])).detach())
        metrics = trainer._metrics["eval"]
        out.append((pair, example, loss, metrics["logps/chosen"][0], metrics["logps/rejected"][0]))
    return root, out


def test_dpo_loss_and_logps_match_trl(trl_pairs):
    root, pairs = trl_pairs
    model_cfg, params = ffl.hf.load(root / "policy")
    ref_params = ffl.hf.load(root / "ref")[1]
    cfg = Config(model=model_cfg, data=DataConfig(objective="dpo", seq_len=T), train=TrainConfig(dpo_beta=BETA))
    model = ffl.build_model(cfg.model)
    tok, template = load_tokenizer(str(root / "policy")), tokenizer_template(root / "policy")
    for pair, trl_example, trl_loss, trl_chosen, trl_rejected in pairs:
        chosen, chosen_mask, rejected, rejected_mask = dpo_tokens(Record("pair", pair), tok, template)
        # The same tokens and the same trained ones as TRL's prompt_ids + chosen_ids.
        prompt = trl_example["prompt_ids"]
        np.testing.assert_array_equal(chosen, prompt + trl_example["chosen_ids"])
        np.testing.assert_array_equal(rejected, prompt + trl_example["rejected_ids"])
        np.testing.assert_array_equal(chosen_mask, np.arange(len(chosen)) >= len(prompt))
        np.testing.assert_array_equal(rejected_mask, np.arange(len(rejected)) >= len(prompt))
        rows = {}
        for side, ids, mask in (("chosen", chosen, chosen_mask), ("rejected", rejected, rejected_mask)):
            n = len(ids)
            rows[side] = np.pad(ids, (0, T - n))[None]
            rows[f"{side}_mask"] = np.pad(mask.astype(np.int32), (0, T - n))[None]
            rows[f"{side}_segment_ids"] = (np.arange(T) < n).astype(np.int32)[None]
            rows[f"{side}_positions"] = np.where(np.arange(T) < n, np.arange(T), 0)[None]
        batch = dpo_batch(rows, pad_id=0)
        loss, sums = jax.jit(lambda p, r, b: loss_and_sums(model, cfg, p, b, deterministic=True, rng=None,
                                                            ref_params=r))(params, ref_params, batch)
        assert float(sums["weight_sum"]) == 1
        np.testing.assert_allclose(float(loss), trl_loss, atol=1e-4)
        np.testing.assert_allclose(float(sums["chosen_logp_sum"]), trl_chosen, atol=1e-4)
        np.testing.assert_allclose(float(sums["rejected_logp_sum"]), trl_rejected, atol=1e-4)
    assert len({round(p[2], 3) for p in pairs}) == len(pairs)  # three different losses, none of them ln 2
    assert all(abs(p[2] - np.log(2)) > 1e-3 for p in pairs)
