"""interop.layout.Map: HF tensor <-> our parameters, both ways, with the meaning kept."""

import numpy as np
import pytest

from flaxformer_lite.interop.layout import Map

D, N, H, F = 6, 2, 3, 5
rng = np.random.default_rng(0)


def test_linear_query_keeps_the_projection():
    w_out_in = rng.standard_normal((N * H, D)).astype(np.float32)  # torch nn.Linear weight
    m = Map("q.weight", ("query",), "linear", in_axes=1)
    (query_DNH,) = m.to_ours(w_out_in, [(D, N, H)])
    x_D = rng.standard_normal(D).astype(np.float32)
    np.testing.assert_allclose(np.einsum("D,DNH->NH", x_D, query_DNH), (w_out_in @ x_D).reshape(N, H), rtol=1e-6)
    np.testing.assert_array_equal(m.to_hf([query_DNH]), w_out_in)


def test_linear_out_projection_keeps_the_projection():
    w_out_in = rng.standard_normal((D, N * H)).astype(np.float32)
    m = Map("o.weight", ("out",), "linear", in_axes=2)
    (out_NHD,) = m.to_ours(w_out_in, [(N, H, D)])
    y_NH = rng.standard_normal((N, H)).astype(np.float32)
    np.testing.assert_allclose(np.einsum("NH,NHD->D", y_NH, out_NHD), w_out_in @ y_NH.reshape(-1), rtol=1e-6)
    np.testing.assert_array_equal(m.to_hf([out_NHD]), w_out_in)


@pytest.mark.parametrize("in_axes, our_shape", [(1, (D, N, H)), (0, (N, H))], ids=["weight", "bias"])
def test_fused_conv1d_splits_along_the_output_axis(in_axes, our_shape):
    fused = rng.standard_normal((D, 3 * N * H) if in_axes else (3 * N * H,)).astype(np.float32)
    m = Map("c_attn", ("q", "k", "v"), "reshape", in_axes=in_axes)
    assert m.hf_shape([our_shape] * 3) == fused.shape
    q, k, v = m.to_ours(fused, [our_shape] * 3)
    np.testing.assert_array_equal(k.reshape(fused.shape[:-1] + (-1,)), fused[..., N * H : 2 * N * H])
    np.testing.assert_array_equal(m.to_hf([q, k, v]), fused)


def test_fused_linear_splits_along_torch_output_rows():
    fused = rng.standard_normal((2 * F, D)).astype(np.float32)
    m = Map("gate_up", ("wg", "wi"), "linear", in_axes=1)
    assert m.hf_shape([(D, F), (D, F)]) == fused.shape
    wg, wi = m.to_ours(fused, [(D, F), (D, F)])
    np.testing.assert_array_equal(wi, fused[F:].T)
    np.testing.assert_array_equal(m.to_hf([wg, wi]), fused)


def test_row_offset_drops_leading_rows_and_restores_zeros():
    table = rng.standard_normal((10, D)).astype(np.float32)
    m = Map("position_embeddings.weight", ("pos",), row_offset=2)
    assert m.hf_shape([(8, D)]) == table.shape
    (ours,) = m.to_ours(table, [(8, D)])
    np.testing.assert_array_equal(ours, table[2:])
    back = m.to_hf([ours])
    np.testing.assert_array_equal(back[2:], table[2:])
    assert not back[:2].any()


@pytest.mark.parametrize("m, our_shapes", [
    (Map("q.weight", ("query",), "linear", in_axes=1), [(D, N, H)]),
    (Map("o.weight", ("out",), "linear", in_axes=2), [(N, H, D)]),
    (Map("c_attn", ("q", "k", "v"), "reshape", in_axes=1), [(D, N, H)] * 3),
    (Map("c_attn.bias", ("q", "k", "v"), "reshape", in_axes=0), [(N, H)] * 3),
    (Map("gate_up", ("wg", "wi"), "linear", in_axes=1), [(D, F), (D, F)]),
    (Map("position_embeddings.weight", ("pos",), row_offset=2), [(8, D)]),
], ids=["linear", "linear out", "fused conv1d", "fused bias", "fused linear", "row offset"])
def test_rows_in_chunks_fill_what_the_whole_tensor_gives(m, our_shapes):
    hf = rng.standard_normal(m.hf_shape(our_shapes)).astype(np.float32)
    whole = m.to_ours(hf, our_shapes)
    outs = [np.full(s, np.nan, np.float64) for s in our_shapes]
    cuts = np.sort(rng.choice(np.arange(1, len(hf)), size=min(3, len(hf) - 1), replace=False))
    for start, stop in zip([0, *cuts], [*cuts, len(hf)]):
        m.rows_into(hf[start:stop], int(start), outs)
    for out, ref in zip(outs, whole):
        assert out.dtype == np.float64  # cast on the way in
        np.testing.assert_array_equal(out, ref)
