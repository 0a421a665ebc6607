"""Every op in flaxformer_lite.ops against a float64 NumPy reference written here."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import normal

from flaxformer_lite import ops

F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=3e-2, atol=3e-2)


def as64(x):
    """A (possibly bfloat16) array as float64 NumPy, rounding already applied."""
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# ------------------------------------------------------------------------------ references


def ref_softmax(logits, visible):
    """Softmax over visible entries; a row with nothing visible is all zeros."""
    logits = np.where(visible, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(visible, np.exp(logits - top), 0.0)
    z = e.sum(-1, keepdims=True)
    return np.divide(e, z, out=np.zeros_like(e), where=z > 0)


def ref_attention(q_BTNH, k_BSKH, v_BSKH, bias=None, mask=None, scale=None):
    """(out [B,T,N,H], weights [B,N,T,S]); query head n reads key/value head n // (N/K)."""
    q, k, v = as64(q_BTNH), as64(k_BSKH), as64(v_BSKH)
    N, H = q.shape[2:]
    k = np.repeat(k, N // k.shape[2], axis=2)
    v = np.repeat(v, N // v.shape[2], axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * (1 / math.sqrt(H) if scale is None else scale)
    if bias is not None:
        logits = logits + as64(bias)
    visible = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), logits.shape)
    weights = ref_softmax(logits, visible)
    return np.einsum("bnts,bsnh->btnh", weights, v), weights


def loop_mask(B, T, S, visible):
    """[B,1,T,S] bool from a per-entry predicate visible(b, t, s)."""
    return np.array([[[[bool(visible(b, t, s)) for s in range(S)] for t in range(T)]] for b in range(B)])


# ------------------------------------------------------------------------------ masks

B, T, S, H = 2, 5, 7, 8


@pytest.fixture(scope="module")
def mask_inputs():
    g = np.random.default_rng(0)
    return dict(
        q_pos=np.broadcast_to(np.arange(T) + S - T, (B, T)),  # queries are the last T key slots
        k_pos=np.broadcast_to(np.arange(S), (B, S)),
        q_len=g.integers(1, T + 1, B), k_len=g.integers(1, S + 1, B),
        q_attn=g.integers(0, 2, (B, T)), k_attn=g.integers(0, 2, (B, S)),
        q_seg=g.integers(0, 3, (B, T)), k_seg=g.integers(0, 3, (B, S)),
    )


def build_mask(kind, m):
    """(ops mask, loop reference) for one mask helper."""
    if kind == "causal":
        return (ops.causal_mask(m["q_pos"], m["k_pos"]),
                loop_mask(B, T, S, lambda b, t, s: m["k_pos"][b, s] <= m["q_pos"][b, t]))
    if kind == "padding_lengths":
        mask = ops.padding_mask(ops.lengths_to_valid(m["q_len"], T), ops.lengths_to_valid(m["k_len"], S))
        return mask, loop_mask(B, T, S, lambda b, t, s: t < m["q_len"][b] and s < m["k_len"][b])
    if kind == "padding_attention_mask":
        return (ops.padding_mask(m["q_attn"], m["k_attn"]),
                loop_mask(B, T, S, lambda b, t, s: m["q_attn"][b, t] == 1 and m["k_attn"][b, s] == 1))
    if kind == "segment":
        return (ops.segment_mask(m["q_seg"], m["k_seg"]),
                loop_mask(B, T, S, lambda b, t, s: m["q_seg"][b, t] == m["k_seg"][b, s] != 0))
    if kind == "sliding_window":
        return (ops.sliding_window_mask(m["q_pos"], m["k_pos"], 3),
                loop_mask(B, T, S, lambda b, t, s: abs(m["q_pos"][b, t] - m["k_pos"][b, s]) < 3))
    if kind == "causal_sliding":
        mask = ops.combine_masks(ops.causal_mask(m["q_pos"], m["k_pos"]), None,
                                 ops.sliding_window_mask(m["q_pos"], m["k_pos"], 3))
        return mask, loop_mask(B, T, S, lambda b, t, s: 0 <= m["q_pos"][b, t] - m["k_pos"][b, s] < 3)
    assert kind == "none"
    return None, None


MASKS = ["none", "causal", "padding_lengths", "padding_attention_mask", "segment", "sliding_window",
         "causal_sliding"]


@pytest.mark.parametrize("kind", MASKS[1:])
def test_mask_helpers_match_their_definition(kind, mask_inputs):
    mask, expected = build_mask(kind, mask_inputs)
    assert mask.shape == (B, 1, T, S) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask), expected)


def test_combine_masks_of_nothing_is_none():
    assert ops.combine_masks(None, None) is None


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_attention_matches_reference(kind, num_heads, num_kv_heads, with_bias, mask_inputs):
    q = normal(1, B, T, num_heads, H)
    k, v = normal(2, B, S, num_kv_heads, H), normal(3, B, S, num_kv_heads, H)
    bias = normal(4, 1, num_heads, T, S) if with_bias else None
    mask, ref_mask = build_mask(kind, mask_inputs)
    out, weights = ops.dot_product_attention(q, k, v, bias, mask, return_weights=True)
    ref_out, ref_weights = ref_attention(q, k, v, bias, ref_mask)
    np.testing.assert_allclose(np.asarray(out), ref_out, **F32)
    np.testing.assert_allclose(np.asarray(weights), ref_weights, **F32)


def test_attention_scale_argument():
    q, k, v = normal(1, B, T, 2, H), normal(2, B, S, 2, H), normal(3, B, S, 2, H)
    out, _ = ops.dot_product_attention(q, k, v, scale=1.0)
    np.testing.assert_allclose(np.asarray(out), ref_attention(q, k, v, scale=1.0)[0], **F32)


@pytest.mark.parametrize("implementation", ["xla", "auto"])
def test_fully_masked_rows_give_zeros_and_finite_gradients(implementation):
    q, k, v = normal(1, B, T, 4, H), normal(2, B, S, 2, H), normal(3, B, S, 2, H)
    mask = np.ones((B, 1, T, S), bool)
    mask[0, 0, 1] = False  # one dead query row for every head
    per_head = np.ones((B, 4, T, S), bool)
    per_head[1, 2, 3] = False  # one dead row on one head only
    for m, dead in [(mask, (0, 1, slice(None))), (per_head, (1, 3, 2))]:
        out, _ = ops.dot_product_attention(q, k, v, mask=m, implementation=implementation)
        assert not np.isnan(np.asarray(out)).any()
        np.testing.assert_array_equal(np.asarray(out)[dead], 0.0)
        np.testing.assert_allclose(np.asarray(out), ref_attention(q, k, v, mask=m)[0], **F32)
        grads = jax.grad(
            lambda q, k, v: ops.dot_product_attention(q, k, v, mask=m, implementation=implementation)[0].sum(),
            argnums=(0, 1, 2),
        )(q, k, v)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    _, weights = ops.dot_product_attention(q, k, v, mask=per_head, return_weights=True)
    np.testing.assert_array_equal(np.asarray(weights)[1, 2, 3], 0.0)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_xla_and_auto_agree(num_kv_heads, mask_inputs):
    q, k, v = normal(5, B, T, 4, H), normal(6, B, S, num_kv_heads, H), normal(7, B, S, num_kv_heads, H)
    bias = normal(8, B, 4, T, S)
    for kind, b in [("segment", bias), ("causal", None), ("none", bias)]:
        mask, _ = build_mask(kind, mask_inputs)
        xla, _ = ops.dot_product_attention(q, k, v, b, mask, implementation="xla")
        auto, _ = ops.dot_product_attention(q, k, v, b, mask, implementation="auto")
        np.testing.assert_allclose(np.asarray(auto), np.asarray(xla), err_msg=kind, **F32)
    # 'auto' falls back to the explicit path when the weights are asked for.
    _, weights = ops.dot_product_attention(q, k, v, bias, implementation="auto", return_weights=True)
    np.testing.assert_allclose(np.asarray(weights), ref_attention(q, k, v, bias)[1], **F32)


@pytest.mark.parametrize("length, ends", [(1024, list(range(128, 1025, 128))), (256, [64, 128, 192, 256]),
                                          (200, [66, 133, 200]), (100, [100])])
def test_causal_block_ends(length, ends):
    assert ops.attention._causal_block_ends(length) == ends


@pytest.mark.parametrize("length", [200, 256], ids=["3_uneven_blocks", "4_blocks"])
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal_only", "with_padding_and_segments"])
def test_causal_blocks_equal_the_masked_square(length, num_kv_heads, masked):
    """causal=True skips whole hidden blocks: values and gradients of the full masked square."""
    q, k, v = normal(1, 2, length, 4, 8), normal(2, 2, length, num_kv_heads, 8), normal(3, 2, length, num_kv_heads, 8)
    bias, cotangent = normal(4, 1, 4, length, length), normal(5, 2, length, 4, 8)
    g = np.random.default_rng(6)
    mask = None
    if masked:
        segments = np.sort(g.integers(0, 3, (2, length)), axis=1)  # 0 = padding at the front
        mask = jnp.asarray(ops.segment_mask(segments, segments))
    tril = np.tril(np.ones((length, length), bool))[None, None]
    square = tril if mask is None else np.asarray(mask) & tril

    def loss(q, k, v, bias, causal):
        out, _ = ops.dot_product_attention(q, k, v, bias, square if not causal else mask, causal=causal)
        return jnp.sum(out * cotangent), out

    both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
    (_, blocked), grads = both(q, k, v, bias, True)
    (_, full), ref_grads = both(q, k, v, bias, False)
    np.testing.assert_allclose(np.asarray(blocked), ref_attention(q, k, v, bias, square)[0], **F32)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), **F32)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)


def test_causal_attention_with_dropout_and_weights():
    q, k, v = normal(1, 2, 128, 2, 8), normal(2, 2, 128, 2, 8), normal(3, 2, 128, 2, 8)
    rng = jax.random.key(0)

    @functools.partial(jax.jit, static_argnums=1)
    def attend(k, rate):
        return ops.dot_product_attention(q, k, v, causal=True, dropout_rate=rate, dropout_rng=rng)[0]

    # Causality by gradients, across the two blocks: row 70 reads keys 0..70 only.
    grad_k = np.asarray(jax.grad(lambda k: attend(k, 0.5)[:, 70].sum())(k))
    assert np.abs(grad_k[:, :71]).sum() > 0 and not grad_k[:, 71:].any()
    dropped, kept = attend(k, 0.5), attend(k, 0.0)
    assert np.isfinite(np.asarray(dropped)).all() and not np.allclose(np.asarray(dropped), np.asarray(kept))
    # With the weights asked for, the whole square is computed and returned.
    tril = np.tril(np.ones((128, 128), bool))[None, None]
    _, weights = ops.dot_product_attention(q, k, v, causal=True, return_weights=True)
    np.testing.assert_allclose(np.asarray(weights), ref_attention(q, k, v, mask=tril)[1], **F32)
    with pytest.raises(ValueError, match="causal=True needs as many keys as queries"):
        ops.dot_product_attention(q, k[:, :64], v[:, :64], causal=True)


def test_cudnn_gets_causal_as_its_mask_type(monkeypatch):
    """What 'cudnn' hands jax.nn (run here by JAX's XLA path with the same arguments)."""
    calls = []
    library = jax.nn.dot_product_attention

    def recorded(q, k, v, bias=None, mask=None, *, scale=None, is_causal=False, implementation=None):
        calls.append(dict(implementation=implementation, is_causal=is_causal, mask=mask))
        return library(q, k, v, bias, mask, scale=scale, is_causal=is_causal, implementation="xla")

    q, k, v = (jnp.asarray(normal(s, 2, 128, 4, 8), jnp.bfloat16) for s in (1, 2, 3))
    segments = np.sort(np.random.default_rng(4).integers(0, 3, (2, 128)), axis=1)  # 0 = padding
    mask = ops.segment_mask(segments, segments)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU.*model.attention_impl"):
        ops.dot_product_attention(q, k, v, None, mask, implementation="cudnn", causal=True)
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    out, _ = ops.dot_product_attention(q, k, v, None, mask, implementation="cudnn", causal=True)
    want, _ = ops.dot_product_attention(q, k, v, None, mask, causal=True)
    np.testing.assert_allclose(as64(out), as64(want), **BF16)
    assert calls[0]["implementation"] == "cudnn" and calls[0]["is_causal"]
    np.testing.assert_array_equal(np.asarray(calls[0]["mask"]), np.asarray(mask))  # no triangle: cuDNN adds it
    ops.dot_product_attention(q, k, v, implementation="cudnn", causal=True)
    assert calls[1]["mask"] is None and calls[1]["is_causal"]  # nothing to turn into a bias
    with pytest.raises(ValueError, match="takes bfloat16 or float16, got float32.*model.dtype"):
        ops.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), implementation="cudnn")
    with pytest.raises(ValueError, match="multiple of 8.*got 12"):
        ops.dot_product_attention(*(jnp.ones((1, 4, 2, 12), jnp.bfloat16),) * 3, implementation="cudnn")


def test_attention_bf16_inputs_keep_a_float32_softmax(mask_inputs):
    q, k, v = (jnp.asarray(normal(s, B, T if s == 1 else S, 4, H), jnp.bfloat16) for s in (1, 2, 3))
    mask, ref_mask = build_mask("causal", mask_inputs)
    out, weights = ops.dot_product_attention(q, k, v, None, mask, return_weights=True)
    ref_out, ref_weights = ref_attention(q, k, v, None, ref_mask)
    assert out.dtype == jnp.bfloat16 and weights.dtype == jnp.float32
    np.testing.assert_allclose(as64(out), ref_out, **BF16)
    # bf16 products are exact in f32, so an f32 softmax matches the f64 one far below bf16 error.
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=1e-5, atol=1e-6)


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="key/value heads do not divide"):
        ops.dot_product_attention(normal(1, 1, 2, 4, 8), normal(2, 1, 2, 3, 8), normal(3, 1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"\[B,T,N,H\]"):
        ops.dot_product_attention(normal(1, 2, 4, 8), normal(2, 2, 4, 8), normal(3, 2, 4, 8))
    with pytest.raises(ValueError, match="use 'xla', 'auto' or 'cudnn'"):
        ops.dot_product_attention(normal(1, 1, 2, 2, 8), normal(2, 1, 2, 2, 8), normal(3, 1, 2, 2, 8),
                                  implementation="flash")


def test_cache_rows_are_batch_major_head_rows():
    k = normal(1, B, S, 3, H)
    rows = np.asarray(ops.cache_rows(k))
    assert rows.shape == (B * 3, S, H)
    for b in range(B):
        for h in range(3):
            np.testing.assert_array_equal(rows[b * 3 + h], np.asarray(k)[b, :, h])


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("queries", [1, T], ids=["one_query", "all_queries"])
def test_cached_attention_equals_attention(kind, num_heads, num_kv_heads, queries, mask_inputs):
    """The cache's row layout changes how the products read K/V, not the result."""
    q = normal(1, B, T, num_heads, H)[:, -queries:]
    k, v = normal(2, B, S, num_kv_heads, H), normal(3, B, S, num_kv_heads, H)
    bias = normal(4, B, num_heads, T, S)[:, :, -queries:]
    mask, _ = build_mask(kind, mask_inputs)
    mask = None if mask is None else mask[:, :, -queries:]
    want, want_weights = ops.dot_product_attention(q, k, v, bias, mask, return_weights=True)
    got, weights = ops.cached_dot_product_attention(
        q, ops.cache_rows(k), ops.cache_rows(v), bias, mask, return_weights=True
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want_weights), **F32)
    jitted = jax.jit(lambda *a: ops.cached_dot_product_attention(*a, scale=0.5)[0])
    np.testing.assert_allclose(
        np.asarray(jitted(q, ops.cache_rows(k), ops.cache_rows(v), bias, mask)),
        np.asarray(ops.dot_product_attention(q, k, v, bias, mask, scale=0.5)[0]), **F32,
    )


def test_cached_attention_rejects_bad_shapes():
    q = normal(1, 2, 1, 4, 8)
    with pytest.raises(ValueError, match=r"\[B\*K,S,H\] \(ops.cache_rows\)"):
        ops.cached_dot_product_attention(q, normal(2, 2, 5, 4, 8), normal(3, 2, 5, 4, 8))
    with pytest.raises(ValueError, match="rows"):
        ops.cached_dot_product_attention(q, normal(2, 3, 5, 8), normal(3, 3, 5, 8))


# ------------------------------------------------------------------------------ positions


def test_sinusoidal_follows_the_2017_formula():
    D = 16
    positions = np.random.default_rng(0).integers(0, 200, (2, 6))
    table = np.asarray(ops.sinusoidal(jnp.asarray(positions), D))
    expected = np.zeros((2, 6, D))
    for b, t in np.ndindex(2, 6):
        for i in range(D // 2):  # PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(...)
            angle = positions[b, t] / 10000 ** (2 * i / D)
            expected[b, t, 2 * i], expected[b, t, 2 * i + 1] = math.sin(angle), math.cos(angle)
    np.testing.assert_allclose(table, expected, atol=5e-5)
    with pytest.raises(ValueError, match="even d_model"):
        ops.sinusoidal(jnp.asarray(positions), 15)


def ref_bucket(offset, bidirectional, num_buckets, max_distance):
    """T5 bucket of offset = key_pos - query_pos (Raffel et al. 2020; Mesh TF description).

    Each direction gets its buckets (both directions: half each, keys after the query in
    the upper half; causal: keys after the query fall into bucket 0). Of a direction's
    buckets, the first half hold the exact distances 0..half-1; the rest cover distances
    up to max_distance with log-spaced edges half * (max_distance/half)^(j/num_log);
    larger distances land in the last bucket.
    """
    distance = -offset  # how far back the key is
    base = 0
    if bidirectional:
        num_buckets //= 2
        base = num_buckets if distance < 0 else 0
        distance = abs(distance)
    distance = max(distance, 0)
    exact = num_buckets // 2
    if distance < exact:
        return base + distance
    num_log = num_buckets - exact
    edges = [exact * (max_distance / exact) ** (j / num_log) for j in range(1, num_log)]
    return base + exact + sum(distance >= e for e in edges)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (16, 64)])
def test_relative_position_bucket_matches_t5_description(bidirectional, num_buckets, max_distance):
    offsets = np.arange(-3 * max_distance, 3 * max_distance + 1)
    got = np.asarray(ops.relative_position_bucket(
        jnp.asarray(offsets), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance))
    expected = [ref_bucket(int(o), bidirectional, num_buckets, max_distance) for o in offsets]
    np.testing.assert_array_equal(got, expected)
    assert got.min() >= 0 and got.max() == num_buckets - 1


def test_relative_position_bias_looks_up_the_table():
    N, R = 3, 16
    table = normal(0, R, N)
    q_pos = np.random.default_rng(1).integers(0, 40, (2, 4))
    k_pos = np.random.default_rng(2).integers(0, 40, (2, 6))
    for bidirectional in (True, False):
        bias = np.asarray(ops.relative_position_bias(
            jnp.asarray(table), jnp.asarray(q_pos), jnp.asarray(k_pos), bidirectional=bidirectional,
            max_distance=32))
        assert bias.shape == (2, N, 4, 6)
        for b, n, t, s in np.ndindex(bias.shape):
            row = ref_bucket(int(k_pos[b, s] - q_pos[b, t]), bidirectional, R, 32)
            assert bias[b, n, t, s] == table[row, n]


def ref_rope(x_BTNH, positions_BT, theta):
    """Pair (x_j, x_{j+H/2}) as the complex number x_j + i x_{j+H/2}, times e^{i pos theta^(-2j/H)}."""
    x = as64(x_BTNH)
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    freq = theta ** (-2.0 * np.arange(half) / x.shape[-1])
    z = z * np.exp(1j * positions_BT[:, :, None, None] * freq)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_is_a_complex_rotation():
    x = normal(0, 2, 5, 3, 8)
    positions = np.random.default_rng(1).integers(0, 64, (2, 5))
    np.testing.assert_allclose(np.asarray(ops.rope(jnp.asarray(x), jnp.asarray(positions), 10000.0)),
                               ref_rope(x, positions, 10000.0), atol=5e-5)
    np.testing.assert_allclose(np.asarray(ops.rope(jnp.asarray(x), jnp.asarray(positions), 500.0)),
                               ref_rope(x, positions, 500.0), atol=5e-5)
    x16 = jnp.asarray(x, jnp.bfloat16)
    out16 = ops.rope(x16, jnp.asarray(positions))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(as64(out16), ref_rope(x16, positions, 10000.0), **BF16)
    with pytest.raises(ValueError, match="even head dim"):
        ops.rope(jnp.asarray(normal(0, 1, 2, 1, 7)), jnp.zeros((1, 2), jnp.int32))


def test_rope_frequency_scaling():
    base = ops.rope_frequencies(16, 10000.0)
    np.testing.assert_allclose(base, 10000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    np.testing.assert_allclose(ops.rope_frequencies(16, 10000.0, kind="linear", factor=4.0), base / 4, rtol=1e-6)
    # Llama 3.1: wavelengths 2 pi / f under 64 / 4 kept, over 64 / 1 divided by 8, blended between.
    scaled = ops.rope_frequencies(16, 10000.0, kind="llama3", factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_len=64)
    wavelength = 2 * np.pi / base
    short, long = wavelength < 16, wavelength > 64
    assert short.any() and long.any() and (~short & ~long).any()  # all three regimes present
    np.testing.assert_allclose(scaled[short], base[short], rtol=1e-6)
    np.testing.assert_allclose(scaled[long], base[long] / 8, rtol=1e-6)
    mid = ~short & ~long
    smooth = (64 / wavelength[mid] - 1.0) / (4.0 - 1.0)
    np.testing.assert_allclose(scaled[mid], (1 - smooth) * base[mid] / 8 + smooth * base[mid], rtol=1e-5)
    x, positions = jnp.asarray(normal(0, 2, 5, 3, 16)), jnp.asarray(np.arange(10).reshape(2, 5))
    np.testing.assert_array_equal(np.asarray(ops.rope(x, positions, inv_freq_J=base)),
                                  np.asarray(ops.rope(x, positions, 10000.0)))


def test_soft_cap_bounds_and_is_near_identity_for_small_values():
    x = jnp.asarray([-1e4, -30.0, -0.01, 0.0, 0.01, 30.0, 1e4])
    y = np.asarray(ops.soft_cap(x, 5.0))
    assert (np.abs(y) < 5.0 + 1e-6).all() and np.all(np.diff(y) > 0)
    np.testing.assert_allclose(y[2:5], np.asarray(x)[2:5], atol=1e-6)
    assert ops.soft_cap(x, None) is x


def test_rope_scores_depend_only_on_the_position_difference():
    q, k = jnp.asarray(normal(0, 1, 1, 1, 16)), jnp.asarray(normal(1, 1, 1, 1, 16))

    def score(m, n):
        qm = ops.rope(q, jnp.full((1, 1), m))
        kn = ops.rope(k, jnp.full((1, 1), n))
        return float(jnp.sum(qm * kn))

    for m, n, shift in [(5, 2, 7), (0, 9, 30), (12, 12, 3)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


@pytest.mark.parametrize("num_heads", [1, 2, 4, 8, 16, 6, 12])
def test_alibi_slopes_are_the_papers_geometric_sequence(num_heads):
    # Press et al. 2022: for 2^k heads the slopes are 2^(-8/n), 2^(-16/n), ..., 2^-8 (8 heads:
    # 1/2 .. 1/256). Otherwise the slopes of the largest power of two below n, then every
    # other slope (the 1st, 3rd, ...) of twice that many heads.
    lower = 2 ** int(math.log2(num_heads))
    expected = [2.0 ** (-8 * (i + 1) / lower) for i in range(lower)]
    expected += [2.0 ** (-8 * (2 * j + 1) / (2 * lower)) for j in range(num_heads - lower)]
    np.testing.assert_allclose(ops.alibi_slopes(num_heads), expected, rtol=1e-6)
    if num_heads == 8:
        np.testing.assert_allclose(ops.alibi_slopes(8), [1 / 2 ** (i + 1) for i in range(8)], rtol=1e-6)


def test_alibi_bias_is_a_linear_distance_penalty():
    slopes = ops.alibi_slopes(6)
    q_pos = np.random.default_rng(0).integers(0, 30, (2, 4))
    k_pos = np.random.default_rng(1).integers(0, 30, (2, 5))
    bias = np.asarray(ops.alibi_bias(slopes, jnp.asarray(q_pos), jnp.asarray(k_pos)))
    expected = np.zeros((2, 6, 4, 5))
    for b, n, t, s in np.ndindex(expected.shape):
        expected[b, n, t, s] = -float(slopes[n]) * abs(q_pos[b, t] - k_pos[b, s])
    np.testing.assert_allclose(bias, expected, rtol=1e-6)


# ------------------------------------------------------------------------------ norms, FFN


def ref_layer_norm(x, scale, bias, eps):
    x = as64(x)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def ref_rms_norm(x, scale, eps):
    x = as64(x)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, F32), (jnp.bfloat16, BF16)], ids=["f32", "bf16"])
def test_norms_match_reference(dtype, tol):
    x = jnp.asarray(normal(0, 2, 3, 16) * 3 + 1, dtype)
    scale, bias = normal(1, 16), normal(2, 16)
    ln = ops.layer_norm(x, jnp.asarray(scale), jnp.asarray(bias), 1e-5)
    rms = ops.rms_norm(x, jnp.asarray(scale), 1e-6)
    assert ln.dtype == dtype and rms.dtype == dtype
    np.testing.assert_allclose(as64(ln), ref_layer_norm(x, scale, bias, 1e-5), **tol)
    np.testing.assert_allclose(as64(rms), ref_rms_norm(x, scale, 1e-6), **tol)
    np.testing.assert_allclose(as64(ops.layer_norm(x, jnp.asarray(scale), None)),
                               ref_layer_norm(x, scale, 0.0, 1e-5), **tol)


REF_ACT = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
}
# Shazeer 2020, table 1: the gate's activation for each GLU variant.
REF_GATE = {"glu": "sigmoid", "reglu": "relu", "geglu": "gelu_tanh", "swiglu": "silu"}


@pytest.mark.parametrize("name", sorted(REF_ACT))
def test_activations_match_reference(name):
    x = normal(0, 4, 32) * 3
    np.testing.assert_allclose(as64(ops.activate(jnp.asarray(x), name)), REF_ACT[name](as64(x)), **F32)


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*silu"):
        ops.activate(jnp.ones(3), "swish")


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", *REF_GATE])
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
def test_feed_forward_matches_reference(activation, use_bias):
    D, F = 8, 12
    x, w_in, w_out = normal(0, 2, 3, D), normal(1, D, F) / 3, normal(2, F, D) / 3
    w_gate = normal(3, D, F) / 3 if ops.is_gated(activation) else None
    b_in, b_out = (normal(4, F), normal(5, D)) if use_bias else (None, None)
    out = ops.feed_forward(jnp.asarray(x), w_in, w_out, activation=activation, w_gate_DF=w_gate,
                           b_in_F=b_in, b_out_D=b_out)
    h = as64(x) @ w_in + (0.0 if b_in is None else b_in)
    if activation in REF_GATE:  # Shazeer 2020: act(x W_gate) * (x W_in)
        h = REF_ACT[REF_GATE[activation]](as64(x) @ w_gate) * h
    else:
        h = REF_ACT[activation](h)
    expected = h @ w_out + (0.0 if b_out is None else b_out)
    np.testing.assert_allclose(np.asarray(out), expected, **F32)
    out16 = ops.feed_forward(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w_in, jnp.bfloat16),
                             jnp.asarray(w_out, jnp.bfloat16), activation=activation,
                             w_gate_DF=None if w_gate is None else jnp.asarray(w_gate, jnp.bfloat16),
                             b_in_F=b_in, b_out_D=b_out)
    np.testing.assert_allclose(as64(out16), expected, **BF16)


def test_gated_feed_forward_needs_a_gate():
    with pytest.raises(ValueError, match="gated: pass w_gate_DF"):
        ops.feed_forward(jnp.ones((1, 1, 4)), jnp.ones((4, 6)), jnp.ones((6, 4)), activation="swiglu")


# ------------------------------------------------------------------------------ loss


def ref_cross_entropy(logits, labels, weights, label_smoothing, z_loss):
    x = as64(logits)
    top = x.max(-1, keepdims=True)
    log_z = (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]
    log_p = x - log_z[..., None]
    V = x.shape[-1]
    # Smoothed target: (1 - eps) one-hot + eps / V (Szegedy et al. 2016).
    target = np.full(x.shape, label_smoothing / V)
    np.put_along_axis(target, labels[..., None], 1 - label_smoothing + label_smoothing / V, axis=-1)
    objective = -(target * log_p).sum(-1) + z_loss * log_z**2
    nll = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
    parts = dict(
        loss_sum=(nll * weights).sum(),
        z_loss_sum=(z_loss * log_z**2 * weights).sum(),
        weight_sum=weights.sum(),
        correct_sum=((x.argmax(-1) == labels) * weights).sum(),
    )
    return (objective * weights).sum() / weights.sum(), parts


@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
def test_cross_entropy_matches_reference(label_smoothing, z_loss):
    g = np.random.default_rng(0)
    logits = normal(1, 3, 6, 11) * 2
    labels = g.integers(0, 11, (3, 6))
    labels[0, :3] = logits[0, :3].argmax(-1)  # some correct predictions for correct_sum
    weights = g.integers(0, 2, (3, 6)).astype(np.float32)
    weights[0, 0] = 1.0
    loss, parts = ops.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights),
                                    label_smoothing=label_smoothing, z_loss=z_loss)
    ref_loss, ref_parts = ref_cross_entropy(logits, labels, weights, label_smoothing, z_loss)
    np.testing.assert_allclose(float(loss), ref_loss, **F32)
    assert sorted(parts) == sorted(ref_parts)
    for name, value in ref_parts.items():
        assert parts[name].dtype == jnp.float32
        np.testing.assert_allclose(float(parts[name]), value, err_msg=name, **F32)



@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.1, 1e-2)])
def test_chunked_cross_entropy_equals_plain_values_and_grads(label_smoothing, z_loss):
    g = np.random.default_rng(2)
    h, table = jnp.asarray(normal(3, 3, 7, 8)), jnp.asarray(normal(4, 13, 8))
    labels = jnp.asarray(g.integers(0, 13, (3, 7)))
    weights = jnp.asarray(g.integers(0, 2, (3, 7)).astype(np.float32))
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)

    def plain(h, table):
        return ops.cross_entropy(jnp.einsum("BTD,VD->BTV", h, table), labels, weights, **kw)

    def chunked(h, table):  # 21 tokens in chunks of 5: the last chunk is padding-filled
        return ops.chunked_cross_entropy(h, table, labels, weights, chunk_size=5, **kw)

    (loss, parts), grads = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(h, table)
    (c_loss, c_parts), c_grads = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(h, table)
    np.testing.assert_allclose(float(c_loss), float(loss), rtol=1e-6)
    for name in parts:
        np.testing.assert_allclose(float(c_parts[name]), float(parts[name]), rtol=1e-6, err_msg=name)
    for a, b in zip(c_grads, grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_chunked_cross_entropy_never_holds_the_whole_logits():
    h = jax.ShapeDtypeStruct((4, 256, 64), jnp.float32)
    table = jax.ShapeDtypeStruct((4096, 64), jnp.float32)
    labels = jnp.zeros((4, 256), jnp.int32)

    def temp_bytes(loss):
        grad = jax.jit(jax.grad(lambda h, t: loss(h, t)[0], argnums=(0, 1)))
        return grad.lower(h, table).compile().memory_analysis().temp_size_in_bytes

    whole = temp_bytes(lambda h, t: ops.cross_entropy(jnp.einsum("BTD,VD->BTV", h, t), labels))
    chunked = temp_bytes(lambda h, t: ops.chunked_cross_entropy(h, t, labels, chunk_size=128))
    logits_bytes = 4 * 256 * 4096 * 4
    assert whole >= logits_bytes and whole > 4 * chunked

def test_cross_entropy_default_weights_and_bf16_logits():
    logits = normal(0, 2, 5, 7)
    labels = np.random.default_rng(1).integers(0, 7, (2, 5))
    loss, parts = ops.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    ref_loss, _ = ref_cross_entropy(logits, labels, np.ones((2, 5)), 0.0, 0.0)
    np.testing.assert_allclose(float(loss), ref_loss, **F32)
    assert float(parts["weight_sum"]) == 10.0
    logits16 = jnp.asarray(logits, jnp.bfloat16)
    loss16, _ = ops.cross_entropy(logits16, jnp.asarray(labels))
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(float(loss16), ref_cross_entropy(logits16, labels, np.ones((2, 5)), 0.0, 0.0)[0],
                               rtol=1e-5)


def test_materialize_cotangent_is_the_identity_for_values_and_gradients():
    rng = np.random.default_rng(3)
    x, w = (jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32) for _ in range(2))

    def loss(x, cut):
        y = ops.materialize_cotangent(x) if cut else x
        return jnp.sum(jnp.tanh(y) * w) + jnp.sum(y * y)

    for fn in (jax.value_and_grad, lambda f: jax.jit(jax.value_and_grad(f))):
        value, grad = fn(lambda x: loss(x, True))(x)
        ref_value, ref_grad = fn(lambda x: loss(x, False))(x)
        np.testing.assert_array_equal(value, ref_value)
        np.testing.assert_array_equal(grad, ref_grad)
    # The cotangent's first entry picks the branch; a NaN there passes through unchanged too.
    g = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32).at[0, 0, 0].set(jnp.nan)
    _, vjp = jax.vjp(ops.materialize_cotangent, x)
    np.testing.assert_array_equal(jax.jit(vjp)(g)[0], g)
