"""Command-line errors of `flaxformer-lite generate`, and `flaxformer-lite bench decode`;
decode.py's own imports.

Generating from run directories and HF folders is tested in test_decode_hf.py.
"""

import ast
import json
import pathlib
import re

import pytest
from decode_helpers import TINY, tiny

import flaxformer_lite as ffl
from flaxformer_lite.cli import main
from flaxformer_lite.runtime import checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory holding the tiny GPT's config (byte tokenizer) and params."""
    path = tmp_path_factory.mktemp("run")
    cfg = ffl.load_config("gpt_tiny", overrides=TINY)
    checkpoint.save_params(path, cfg, tiny("gpt_tiny")[1])
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "OTHER"], r"different model section .*model.d_model.*drop --config"),
        (["--hf", "somewhere"], "pass one model source"),
        (["--stop", ""], "--stop '' is empty"),
        (["--prompt", "y", "--stream"], "--stream prints one prompt"),
        (["--prompt", ""], r"--prompt 2 is empty: give text to continue"),
        (["--max-new-tokens", "64"], r"prompt \(2\) \+ max_new_tokens \(64\) = 66 tokens overflows model.max_len=64"),
        (["--step", "7"], "no checkpoint for step 7"),
    ],
)
def test_bad_command_input_prints_one_error_line(workdir, tmp_path, capsys, args, message):
    other = tmp_path / "other.yaml"
    ffl.dump_config(ffl.load_config("gpt_tiny", overrides=[*TINY, "model.d_model=64"]), other)
    args = [str(other) if a == "OTHER" else a for a in args]
    assert main(["generate", "--workdir", str(workdir), "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err)


def test_stream_prints_what_the_plain_command_prints(workdir, capsys):
    argv = ["generate", "--workdir", str(workdir), "--prompt", "ab", "--max-new-tokens", "12", "--ignore-eos",
            "--method", "sample", "--seed", "3"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert streamed == plain and plain.startswith("ab") and len(plain) > len("ab\n")
    # --stop TEXT cuts the continuation at its first occurrence, as serve's stop does: a stop
    # of several tokens (two bytes here), streamed or not, and one of a single token.
    continuation = plain[len("ab"):-1]
    pair = next(continuation[i:i + 2] for i in range(1, len(continuation) - 1) if "\ufffd" not in continuation[i:i + 2])
    for stop, streams in ((pair, ("", "--stream")), (pair[1], ("",))):
        for stream in streams:
            assert main([*argv, "--stop", stop, *([stream] if stream else [])]) == 0
            assert capsys.readouterr().out == "ab" + continuation[: continuation.index(stop)] + "\n", (stop, stream)


def test_decoding_depends_on_models_alone():
    """decode.py imports no interop/data/train/checkpoint: the command glue is elsewhere."""
    source = pathlib.Path(ffl.__file__).parent / "inference" / "decode.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    ours = {m for m in imported if m.startswith("flaxformer_lite")}
    assert not {m for m in ours if not m.startswith(("flaxformer_lite.models", "flaxformer_lite.config"))}


def test_generate_needs_a_model_source(capsys):
    assert main(["generate", "--prompt", "x"]) == 2
    assert "pass a model: --workdir DIR" in capsys.readouterr().err


def test_bench_decode_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--json", str(out), "--layers", "1", "--d-model", "32", "--heads", "2",
                 "--vocab", "320", "--max-len", "64", "--prompt-len", "4", "--new-tokens", "6",
                 "--positions", "8", "--step-tokens", "2", "--repeats", "2", "--batch", "2",
                 "--profile", str(tmp_path / "trace")]) == 0
    results = json.loads(out.read_text())
    assert results["same_tokens"] is True
    # Both sides timed in alternating rounds: one ratio per round, per-token times per position.
    assert len(results["speedup_rounds"]) == 2 and all(r > 0 for r in results["speedup_rounds"])
    assert set(results["per_token_ms"]["8"]) == {"ours", "transformers"}
    # --batch 2: two prompts, every row's tokens equal; tokens/s counts both rows.
    assert results["workload"]["batch"] == 2
    assert results["ours"]["tokens_per_s"] == pytest.approx(2 * 6 / results["ours"]["seconds"])
    assert results["ours"]["tokens_per_s"] > 0 and results["transformers"]["tokens_per_s"] > 0
    assert results["lm_head_ms"]["ours"] > 0 and results["lm_head_ms"]["transformers"] > 0
    report = capsys.readouterr().out
    assert "speedup" in report and "LM head alone" in report
    # --profile: one generate call traced, its op time split into the token loop and the prefill.
    profile = results["profile"]
    assert profile["unit"] == "token" and list((tmp_path / "trace").glob("**/*.xplane.pb"))
    loop_ms = sum(s["ms_per_step"] for s in profile["split"] if s["phase"] == "token loop")
    assert 0 < loop_ms <= profile["op_ms_per_step"]
    assert sum(s["ms_per_step"] for s in profile["split"]) == pytest.approx(profile["op_ms_per_step"])
    assert any(o["kind"] == "matmul" and o["in_loop"] for o in profile["top_ops"])
    assert not any(o["op"].startswith("while") for o in profile["top_ops"])  # the loop op spans its body
    loop_products = [m for m in profile["matmuls"] if m["phase"] == "token loop"]
    assert loop_products and all(m["flops_per_step"] > 0 and m["flops_per_s"] > 0 for m in loop_products)
    assert "ms of XLA ops a token" in report


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A tiny Llama chat folder (tests/hf_chat_folder.py) whose third greedy reply token is
    declared a stop id in generation_config.json, so the reply ends there."""
    import torch
    import transformers
    from hf_chat_folder import write_llama_chat_folder

    path = tmp_path_factory.mktemp("chat")
    model = write_llama_chat_folder(path)
    ids = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        CHAT, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    with torch.no_grad():
        free = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    reply = free[0, len(ids):].tolist()
    stop = next(t for i, t in enumerate(reply) if i >= 2 and t not in reply[:i])
    write_llama_chat_folder(path, stop_ids=[stop])
    return path


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the quick brown fox"},
        {"role": "assistant", "content": "jumps"}, {"role": "user", "content": "over the lazy dog"}]


def test_chat_replies_as_transformers_and_stops_at_any_eos(chat_dir, capsys):
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(chat_dir).eval()
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():  # eos_token_id from generation_config.json: [<|im_end|>, <|endoftext|>, stop]
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    reply = out[0, len(ids):].tolist()
    assert reply[-1] in model.generation_config.eos_token_id and len(reply) < 16
    turns = [a for m in CHAT[1:] for a in ("--chat", m["content"])]
    assert main(["generate", "--hf", str(chat_dir), "--system", "Be brief.", *turns, "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(reply, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--chat", "a", "--chat", "b"], "--chat given 2 times"),
        (["--chat", "a", "--prompt", "b"], "not both"),
        (["--system", "s", "--prompt", "b"], "--system is the system message of a --chat"),
        (["--chat", "a", "--hf", "NOTEMPLATE"], "has no chat template"),
    ],
)
def test_chat_errors(chat_dir, tmp_path, capsys, args, message):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (bare / name).write_bytes((chat_dir / name).read_bytes())
    args = ["--hf", str(chat_dir), *args] if "--hf" not in args else [str(bare) if a == "NOTEMPLATE" else a for a in args]
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_sampling_defaults_come_from_generation_config_and_flags_win(chat_dir, tmp_path, capsys):
    """generate takes temperature/top_k/top_p (--method sample) and repetition_penalty from
    the folder's generation_config.json where no flag gives them: top_k 1 there makes
    sampling greedy, --top-k 0 undoes it; its repetition penalty applies to greedy too."""
    import shutil

    folder = tmp_path / "chat"
    shutil.copytree(chat_dir, folder)
    config_file = folder / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "do_sample": True, "top_k": 1,
                                       "repetition_penalty": 2.0}))

    def reply(*flags):
        assert main(["generate", "--hf", str(folder), "--chat", "the quick brown fox", "--max-new-tokens", "12",
                     "--ignore-eos", *flags]) == 0
        return capsys.readouterr().out

    greedy = reply()
    assert greedy == reply("--repetition-penalty", "2") != reply("--repetition-penalty", "1")
    assert all(reply("--method", "sample", "--seed", str(seed)) == greedy for seed in range(3))
    assert any(reply("--method", "sample", "--seed", str(seed), "--top-k", "0") != greedy for seed in range(3))
