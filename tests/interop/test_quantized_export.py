"""A LoRA run on a quantized base read from an HF folder, and its exports: merged into the
folder's original weights, with one line on how far the rounded base moved the logits."""

import dataclasses
import json

import numpy as np
import pytest
from flax import traverse_util
from hf_chat_folder import write_llama_chat_folder

from flaxformer_lite import cli
from flaxformer_lite.interop import hf
from flaxformer_lite.layers import lora
from flaxformer_lite.runtime import checkpoint


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4_run")
    write_llama_chat_folder(root / "src")
    chat = root / "chat.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"the number {i}"}, {"role": "assistant", "content": f"is {i}"}]}
             for i in range(16)]
    chat.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli.main(["train", "--init-from", str(root / "src"), "--workdir", str(root / "run"), "--set",
                     "model.lora.rank=4", "model.lora.targets=[query,value,wo]", "model.lora.base_dtype=nf4",
                     "data.objective=sft", f"data.corpus={chat}", "train.num_steps=2", "train.learning_rate=1e-2",
                     "data.batch_size=8", "data.seq_len=64", "train.eval_batches=1", "train.log_every=1",
                     "train.peak_flops=1e12"]) == 0
    return root


def test_the_base_is_quantized_as_it_is_read_and_left_as_it_was(nf4_run):
    cfg, params = checkpoint.load_params(nf4_run / "run")
    flat = traverse_util.flatten_dict(params)
    _, source = hf.load(nf4_run / "src", quantize="nf4")
    expected = traverse_util.flatten_dict(source)
    query = ("params", "decoder", "layers_0", "self_attention", "query")
    assert flat[query].dtype == np.uint8 and query[:-1] + ("query_absmax",) in flat
    for key, value in expected.items():  # every frozen array as hf.load quantizes it, bit for bit
        np.testing.assert_array_equal(flat[key], value)


def test_exports_merge_into_the_original_weights_and_say_how_far_the_rounding_moved(nf4_run, capsys):
    run = nf4_run / "run"
    assert cli.main(["convert", "--from", str(run), "--to-hf", str(nf4_run / "merged")]) == 0
    assert cli.main(["convert", "--from", str(run), "--to-peft", str(nf4_run / "adapter")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "trained against a base stored in nf4" in line]
    assert [line.split(":")[0] for line in lines] == ["--to-hf", "--to-peft"]
    differences = [float(line.split("differ by at most ")[1].split(" ")[0]) for line in lines]
    assert differences[0] == differences[1] > 0
    # The merged folder is the adapters merged onto the float32 source, not onto the nf4 codes.
    cfg, params = checkpoint.load_params(run)
    _, original = hf.load(nf4_run / "src")
    plain = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, base_dtype=None))
    expected = traverse_util.flatten_dict(lora.merge(lora.join(lora.split(params)[0], original), plain))
    _, merged = hf.load(nf4_run / "merged")
    merged = traverse_util.flatten_dict(merged)
    assert set(merged) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(merged[key], value, atol=1e-6)
    wi = ("params", "decoder", "layers_0", "mlp", "wi")  # not adapted: exactly the source's
    np.testing.assert_array_equal(merged[wi], traverse_util.flatten_dict(original)[wi])

