"""Tiny random models, HF folders made of them, and `flaxformer-lite serve` subprocesses."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import tokenizers

import flaxformer_lite as ffl
from flaxformer_lite import data
from flaxformer_lite.interop import hf
from flaxformer_lite.models import init_params

VOCAB = 320  # byte-level BPE: 4 specials (<pad> <s> </s> <mask>) + 256 bytes + 60 merges
# ChatML with </s> closing each turn, so the model's EOS ends the assistant's reply.
CHATML = (
    "{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)
TINY = (
    "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=8", "model.d_ff=64",
    "model.num_layers=2", "model.max_len=1024", f"model.vocab_size={VOCAB}", "model.tie_embeddings=false",
    "model.bos_token_id=1", "model.eos_token_id=2", "model.pad_token_id=0",
)


def tiny_model(preset="llama_tiny", overrides=TINY):
    """(ModelConfig, params): random weights large enough that greedy paths vary."""
    cfg = ffl.load_config(preset, overrides=list(overrides)).model
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(3)

    def draw(path, s):
        centre = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return rng.normal(centre, 0.3, s.shape).astype(s.dtype)

    return cfg, jax.tree_util.tree_map_with_path(draw, shapes)


def llama_folder(path: pathlib.Path) -> pathlib.Path:
    """config.json + model.safetensors + tokenizer.json + tokenizer_config.json (chat template)."""
    cfg, params = tiny_model()
    hf.save(cfg, params, path)
    data.train_tokenizer(data.builtin_documents()[:50], kind="bpe", vocab_size=VOCAB, out_path=path, num_sentinels=0)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHATML,
    }))
    return path


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"a cat dog sat on the mat sun is hot".split()]


def bert_folder(path: pathlib.Path) -> pathlib.Path:
    """A random BERT (HF layout) and a WordPiece tokenizer.json adding [CLS] ... [SEP]."""
    cfg, params = tiny_model("bert_tiny", ("model.d_model=32", "model.num_heads=4", "model.d_ff=64",
                                            "model.num_layers=2", "model.max_len=64", "data.seq_len=64",
                                            f"model.vocab_size={len(BERT_WORDS)}"))
    hf.save(cfg, params, path)
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece({w: i for i, w in enumerate(BERT_WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(path / "tokenizer.json"))
    return path


class ScriptedEngine:
    """The engine's interface, replying to every sequence with `text`, in token events of
    `piece` characters (the app in-process, without a model)."""

    draining = False
    max_batch = 1
    max_adapters = 0
    stats: dict = {}

    def __init__(self, text, piece=1000):
        self.text, self.piece, self.prompts = text, piece, []

    def check(self, prompt, params):
        pass

    def queued(self):
        return 0

    def busy(self):
        return 0

    def adapters(self):
        return []

    def submit(self, prompt, params, sink, adapter=None):
        self.prompts.append(prompt)
        for start in range(0, len(self.text), self.piece):
            sink({"type": "token", "text": self.text[start:start + self.piece], "tokens": []})
        sink({"type": "done", "finish_reason": "stop", "text": self.text, "error": None, "prompt_logprobs": None,
              "prompt_tokens": len(prompt), "completion_tokens": 7, "cached_tokens": 0})
        return self

    def cancel(self):
        pass


def request(url: str, body=None, timeout: float = 60):
    """(status, headers, JSON body) of a GET, or a POST of `body`; HTTP errors included."""
    data_ = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data_, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`flaxformer-lite serve` in a subprocess on a free port."""

    def __init__(self, folder, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "FLAXFORMER_LITE_COMPILATION_CACHE": "0",
               "PYTHONPATH": str(pathlib.Path(__file__).parents[2])}
        env.pop("FLAXFORMER_LITE_API_KEY", None)  # the tests' servers ask for no key unless a flag says so
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flaxformer_lite", "serve", "--hf", str(folder), "--name", "tiny",
             "--port", str(self.port), *flags],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def wait_ready(self, timeout: float = 240.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if request(self.url + "/health")[0] == 200:
                    return self
            except OSError:  # not listening yet
                pass
            time.sleep(0.25)
        raise TimeoutError("server did not start")

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kwargs)

    def health(self) -> dict:
        return request(self.url + "/health")[2]

    def post(self, path: str, body: dict):
        return request(self.url + path, body)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()




def adapter_folder(path: pathlib.Path, rank: int, targets: tuple, seed: int, alpha: float = 16.0) -> pathlib.Path:
    """A PEFT LoRA folder for tiny_model()'s base: random A and B (not PEFT's zero B), so
    the adapter changes what the model says."""
    import dataclasses

    from flaxformer_lite.config import LoraConfig
    from flaxformer_lite.interop import peft
    from flaxformer_lite.layers import lora

    base_cfg, base = tiny_model()
    cfg = dataclasses.replace(base_cfg, lora=LoraConfig(rank=rank, alpha=alpha, targets=targets))
    shapes = lora.split(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))[0]
    rng = np.random.default_rng(seed)
    adapters = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
    return peft.save_adapters(cfg, lora.join(adapters, base), path, model_type="llama")
