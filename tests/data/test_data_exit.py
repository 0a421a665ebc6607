"""A batch iterator left open at interpreter exit ends quietly (grain prefetch threads)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    from flaxformer_lite import data
    texts = ["a few words of text, repeated to fill some rows. " * 4] * 16
    ds = data.make_dataset("causal_lm", texts, tokenizer=data.ByteTokenizer(), batch_size=4, seq_len=32)
    it = iter(ds)
    print(next(it)["input_ids"].shape)
""")


@pytest.mark.parametrize("attempt", range(2))
def test_an_unclosed_iterator_exits_cleanly(attempt):
    # Without the atexit close, every run here failed one way or the other: an abort
    # (status 134, "terminate called without an active exception") or grain's
    # "AttributeError: 'NoneType' object has no attribute 'Empty'" on stderr.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(4, 32)"
    assert "Exception ignored" not in done.stderr and "terminate called" not in done.stderr, done.stderr
