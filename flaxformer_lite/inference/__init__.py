"""Inference: decoding with a KV cache (decode.py: greedy, sampling, beam; `ffl.generate`),
the continuous-batching engine the server drives (engine.py, text.py), sentence
embeddings (embeddings.py: `ffl.embed`; embedder.py: the server's batched embedder), and
the `generate` and `embed` commands (commands.py). No HTTP here, and never train/.

Nothing is imported here, so `flaxformer-lite generate --help` starts no JAX.
"""
