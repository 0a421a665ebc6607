"""Session-wide tiny HF folders and the servers the HTTP tests share (serve_helpers.py)."""

import pytest
from serve_helpers import Server, bert_folder, llama_folder


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A tiny LLaMA folder with a BPE tokenizer and a ChatML template."""
    return llama_folder(tmp_path_factory.mktemp("serve_hf"))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return bert_folder(tmp_path_factory.mktemp("serve_bert"))


@pytest.fixture(scope="module")
def servers(hf_dir, bert_dir):
    """The main server (16 slots), a one-slot one for the queue, disconnect and drain
    tests, and an encoder's for embeddings; started together so their warm-ups overlap."""
    started = {
        "main": Server(hf_dir, "--max-batch", "16", "--max-len", "128", "--chunk", "16"),
        "small": Server(hf_dir, "--max-batch", "1", "--max-queue", "1", "--max-len", "1024", "--chunk", "16",
                        "--drain-timeout", "60"),
        "embed": Server(bert_dir, "--max-batch", "4", "--max-len", "32"),
    }
    try:
        yield {name: server.wait_ready() for name, server in started.items()}
    finally:
        for server in started.values():
            server.close()


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    """Three PEFT adapters of tiny_model()'s base (hf_dir's), of ranks 2, 4 and 8 on
    different projections: {name: folder}."""
    from serve_helpers import adapter_folder

    root = tmp_path_factory.mktemp("serve_adapters")
    shapes = {"r2": (2, ("query", "value")), "r4": (4, ("query", "key", "value", "out")),
              "r8": (8, ("query", "value", "wi", "wo"))}
    return {name: adapter_folder(root / name, rank, targets, seed)
            for seed, (name, (rank, targets)) in enumerate(shapes.items())}
