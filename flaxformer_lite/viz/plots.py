"""Attention and position-encoding plots.

    flaxformer-lite viz --workdir runs/gpt_tiny --text "The quick brown fox" --out viz/
    flaxformer-lite viz --positions --config t5_tiny --out viz/positions

Attention: per-layer head grids (PNG) and an interactive head view (HTML). The page is
self-contained (no network): pick the attention (encoder self, decoder self, cross), the
layer and a head (or the mean over heads); hover a token on the left to see where it
attends on the right, as in BertViz's head view (Vig 2019).

Positions (`plot_positions`): one PNG per scheme (and per stack where each stack has its
own parameters), drawn from the functions in ops/positions.py and the model's own
parameters: the sinusoidal table, a learned table's cosine similarity, RoPE's rotation,
T5's buckets and per-head bias, ALiBi's per-head bias.
"""

from __future__ import annotations

import html
import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.layers.attention import rope_frequencies
from flaxformer_lite.models import build_model, init_params

# Which token row each attention kind's queries and keys come from.
_SIDES = {"encoder": ("source", "source"), "decoder": ("target", "target"), "cross": ("target", "source")}


def attention_maps(
    cfg: ModelConfig,
    params: dict,
    input_ids: np.ndarray,
    target_ids: Optional[np.ndarray] = None,
) -> dict[str, np.ndarray]:
    """{kind: [L,N,T,S] float32} attention probabilities for one unpadded sequence.

    Kinds: 'encoder' (encoder self-attention), 'decoder' (causal self-attention),
    'cross' (decoder over encoder). Encoder-decoder models need `target_ids`, the
    decoder input (starting with the decoder start token).
    """
    ids = jnp.asarray(input_ids, jnp.int32)[None]
    for name, arr in (("input_ids", input_ids), ("target_ids", target_ids)):
        if arr is not None and (len(arr) == 0 or int(np.max(arr)) >= cfg.vocab_size or int(np.min(arr)) < 0):
            raise ValueError(f"{name} must be non-empty token ids in [0, {cfg.vocab_size})")
    model = build_model(cfg)
    if cfg.family == "encoder_decoder":
        if target_ids is None:
            raise ValueError("an encoder_decoder model needs target_ids (the decoder input) to show cross-attention")
        out = model.apply(params, ids, jnp.asarray(target_ids, jnp.int32)[None], return_attentions=True)
    else:
        out = model.apply(params, ids, return_attentions=True)
    return {kind: np.asarray(w[:, 0], np.float32) for kind, w in out.attentions.items()}


def plot_heads(weights_LNTS: np.ndarray, layer: int, q_tokens: list[str], k_tokens: list[str], path, title=""):
    """One PNG: every head of `layer` as a heatmap (rows: queries, columns: keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N = weights_LNTS.shape[1]
    cols = min(N, 4)
    rows = -(-N // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    label = len(q_tokens) <= 40 and len(k_tokens) <= 40  # beyond that labels are unreadable
    for h, ax in enumerate(axes.flat):
        if h >= N:
            ax.axis("off")
            continue
        ax.imshow(weights_LNTS[layer, h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=9)
        if label:
            ax.set_xticks(range(len(k_tokens)), k_tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(len(q_tokens)), q_tokens, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or f"layer {layer}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>attention: __TITLE__</title>
<style>
body{font-family:sans-serif;margin:1.5em}
#view{display:flex;gap:0}
.col div{height:20px;line-height:20px;padding:0 6px;font-family:monospace;white-space:pre;cursor:default}
.col.left div{text-align:right}
.col div.on{background:#fd4}
svg{flex:none}
</style></head><body>
<h3>__TITLE__</h3>
<label>attention <select id="kind"></select></label>
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<p>Hover a query token (left): lines show its attention over the keys (right); darker is more.</p>
<div id="view"><div class="col left" id="q"></div><svg id="lines" width="240"></svg><div class="col" id="k"></div></div>
<script>
const D = __DATA__;
const $ = id => document.getElementById(id);
function fill(sel, items){ sel.innerHTML = items.map(([v,t]) => `<option value="${v}">${t}</option>`).join(""); }
function tokens(el, toks){ el.innerHTML = toks.map((t,i) => `<div data-i="${i}">${t}</div>`).join(""); }
function matrix(){
  const m = D.maps[$("kind").value][+$("layer").value], h = $("head").value;
  if (h !== "mean") return m[+h];
  return m[0].map((row,t) => row.map((_,s) => m.reduce((a,hm) => a + hm[t][s], 0) / m.length));
}
function draw(only){
  const W = matrix(), svg = $("lines"), n = Math.max(W.length, W[0].length);
  svg.setAttribute("height", 20 * n);
  let out = "";
  W.forEach((row,t) => { if (only !== undefined && only !== t) return;
    row.forEach((w,s) => { if (w > 0.01) out += `<line x1="0" y1="${20*t+10}" x2="240" y2="${20*s+10}" stroke="#2463b5" stroke-opacity="${w.toFixed(3)}" stroke-width="2"/>`; }); });
  svg.innerHTML = out;
  document.querySelectorAll("#q div").forEach(d => d.classList.toggle("on", +d.dataset.i === only));
}
function kindChanged(){
  const k = $("kind").value, L = D.maps[k].length, N = D.maps[k][0].length;
  fill($("layer"), [...Array(L).keys()].map(i => [i, i]));
  fill($("head"), [["mean","mean"], ...[...Array(N).keys()].map(i => [i, i])]);
  tokens($("q"), D.tokens[D.sides[k][0]]); tokens($("k"), D.tokens[D.sides[k][1]]);
  document.querySelectorAll("#q div").forEach(d => { d.onmouseenter = () => draw(+d.dataset.i); });
  $("q").onmouseleave = () => draw();
  draw();
}
fill($("kind"), Object.keys(D.maps).map(k => [k, k]));
$("kind").onchange = kindChanged; $("layer").onchange = () => draw(); $("head").onchange = () => draw();
kindChanged();
</script></body></html>
"""


def render_html(maps: dict[str, np.ndarray], source_tokens: list[str], target_tokens: Optional[list[str]], path, title=""):
    """Write the self-contained interactive head view."""
    data = {
        "maps": {k: np.round(v, 4).tolist() for k, v in maps.items()},
        "tokens": {"source": [html.escape(t) for t in source_tokens],
                   "target": [html.escape(t) for t in (target_tokens or source_tokens)]},
        "sides": {k: _SIDES[k] for k in maps},
    }
    if "decoder" in maps and target_tokens is None:  # decoder-only: its input is the "source" row
        data["sides"]["decoder"] = ("source", "source")
    page = _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", json.dumps(data))
    pathlib.Path(path).write_text(page, encoding="utf-8")


def visualize(cfg: ModelConfig, params: dict, tokenizer, text: str, out_dir, target: Optional[str] = None) -> list[pathlib.Path]:
    """Run `text` (and `target`, encoder-decoder) through the model; write PNGs and index.html."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source_ids = tokenizer.encode(text)
    if not source_ids:
        raise ValueError("--text is empty after tokenization: give some text to look at")
    target_ids = None
    if cfg.family == "encoder_decoder":
        target_ids = [cfg.decoder_start_token_id] + tokenizer.encode(target or "")
    limit = cfg.max_len
    if len(source_ids) > limit or (target_ids and len(target_ids) > limit):
        raise ValueError(f"text is longer than model.max_len={limit} tokens: shorten --text/--target")
    maps = attention_maps(cfg, params, np.asarray(source_ids), None if target_ids is None else np.asarray(target_ids))
    label = lambda ids: [tokenizer.decode([i]) or f"<{i}>" for i in ids]  # noqa: E731
    src_tok = label(source_ids)
    tgt_tok = label(target_ids) if target_ids is not None else None
    written = []
    for kind, w in maps.items():
        q_side, k_side = _SIDES[kind]
        q_tok = tgt_tok if (q_side == "target" and tgt_tok) else src_tok
        k_tok = tgt_tok if (k_side == "target" and tgt_tok) else src_tok
        for layer in range(w.shape[0]):
            path = out / f"{kind}_layer{layer}.png"
            plot_heads(w, layer, q_tok, k_tok, path, title=f"{kind} attention, layer {layer}")
            written.append(path)
    page = out / "index.html"
    render_html(maps, src_tok, tgt_tok, page, title=text[:60])
    written.append(page)
    return written


# --------------------------------------------------------------------- position encodings

FRESH_INIT = "fresh init (seed 0, untrained)"


def _position_params(params) -> dict[tuple[str, str], np.ndarray]:
    """{(stack, 'learned' | 'relative'): table} found in a parameter tree.

    Found by name, not by place, so unrolled, scanned or fused layouts all work: a
    learned table is `<stack>/.../position_embedding/embedding` [max_len,D], a T5 table
    is `<stack>/.../relpos_bias` [R,N].
    """
    from flax import traverse_util

    tree = params.get("params", params)  # {'params': ...} or the inner tree
    found = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
        if path[-1] == "relpos_bias":
            found[(path[0], "relative")] = leaf
        elif path[-1] == "embedding" and "position_embedding" in path:
            found[(path[0], "learned")] = leaf
    return found


def _fresh_position_params(cfg: ModelConfig) -> dict[tuple[str, str], np.ndarray]:
    # Under jit, XLA drops the initialisers of every other parameter: no full model is allocated.
    picked = jax.jit(lambda key: {"/".join(k): v for k, v in _position_params(init_params(cfg, key)).items()})
    return {tuple(k.split("/")): v for k, v in picked(jax.random.key(0)).items()}


def _cosine_similarity(table_PD: np.ndarray) -> np.ndarray:
    unit_PD = table_PD / np.maximum(np.linalg.norm(table_PD, axis=-1, keepdims=True), 1e-12)
    return unit_PD @ unit_PD.T


def position_arrays(
    cfg: ModelConfig, params: Optional[dict] = None, *, length: Optional[int] = None
) -> dict[str, dict[str, np.ndarray]]:
    """The numbers behind each position plot, keyed by the plot's file name (no .png).

    P = `length` (default model.max_len) positions; X indexes a distance axis
    (key position - query position, so the past is negative).
      sinusoidal:        table_PD (ops.sinusoidal), similarity_PP (cosine).
      learned_<stack>:   table_PD (the first P rows), similarity_PP (cosine).
      rope:              cos_PJ, sin_PJ: where pair j's unit vector (1, 0) is turned to
                         at position p (ops.rope on unit vectors); distance_X and
                         score_X, the dot product of an all-ones query and key X
                         positions apart, over H.
      relative_<stack>:  distance_X, bucket_X (ops.relative_position_bucket) and bias_NX
                         (ops.relative_position_bias); encoder stacks are bidirectional,
                         decoder stacks see only the past.
      alibi:             distance_X, slopes_N, bias_NX (ops.alibi_bias).
    Learned tables and T5 tables come from `params` ({'params': ...}, as init_params,
    checkpoint.load_params and hf.load give them), or from a fresh init when None.
    """
    if cfg.position == "none":
        raise ValueError("model.position is 'none': there is no position encoding to plot "
                         "(use a config with learned, sinusoidal, relative, rope or alibi positions)")
    P = cfg.max_len if length is None else length
    if P < 2:
        raise ValueError(f"length={P}: plot at least 2 positions")
    out: dict[str, dict[str, np.ndarray]] = {}
    if cfg.position == "sinusoidal":
        table_PD = _computed(lambda: ops.sinusoidal(jnp.arange(P)[None], cfg.d_model)[0])
        out["sinusoidal"] = {"table_PD": table_PD, "similarity_PP": _cosine_similarity(table_PD)}
    elif cfg.position == "rope":
        out["rope"] = _computed(lambda: _rope_arrays(P, cfg.dim_per_head, rope_frequencies(cfg)))
    elif cfg.position == "alibi":
        M = P - 1
        X = 2 * M + 1 if cfg.family != "decoder" else M + 1  # decoders see only the past
        slopes_N = ops.alibi_slopes(cfg.num_heads)
        out["alibi"] = _computed(lambda: {
            "distance_X": jnp.arange(X) - M,
            "slopes_N": jnp.asarray(slopes_N),
            "bias_NX": ops.alibi_bias(slopes_N, jnp.full((1, 1), M), jnp.arange(X)[None])[0, :, 0],
        })
    else:  # learned, relative: parameters
        found = _fresh_position_params(cfg) if params is None else _position_params(params)
        stacks = [k for k in ("encoder", "decoder") if (k, cfg.position) in found]
        if not stacks:
            what = "position_embedding/embedding" if cfg.position == "learned" else "relpos_bias"
            raise ValueError(f"params hold no {what} table for model.position={cfg.position!r}: "
                             "pass the parameters that belong to this config")
        for stack in stacks:
            table = np.asarray(found[(stack, cfg.position)], np.float32)
            if cfg.position == "learned":
                if P > table.shape[0]:
                    raise ValueError(f"length={P} exceeds the learned table's {table.shape[0]} rows "
                                     "(model.max_len): plot at most that many positions")
                out[f"learned_{stack}"] = {"table_PD": table[:P], "similarity_PP": _cosine_similarity(table[:P])}
            else:
                # Encoder stacks are bidirectional; past relative_max_distance every offset
                # shares the last bucket, and the plot shows some of that.
                M = max(P - 1, cfg.relative_max_distance * 3 // 2)
                out[f"relative_{stack}"] = _computed(
                    lambda t=table, b=stack == "encoder": _relative_arrays(t, M, b, cfg.relative_max_distance)
                )
    return out


def _computed(fn) -> dict:
    # One jit: eagerly, every small op compiles on its own, which is many times slower.
    return jax.tree.map(np.asarray, jax.jit(fn)())


def _rope_arrays(P: int, H: int, inv_freq_J: jax.Array) -> dict:
    J = H // 2
    positions_1P = jnp.arange(P)[None]
    # Head j of the input is the unit vector of pair j's first dimension; after the
    # rotation that dimension holds cos(angle), its partner j + H/2 holds sin(angle).
    rotated_PJH = ops.rope(jnp.broadcast_to(jnp.eye(J, H), (1, P, J, H)), positions_1P, inv_freq_J=inv_freq_J)[0]
    # Position 0 is not rotated, so this is q(p) . k(0): RoPE's score at distance p.
    score_X = ops.rope(jnp.ones((1, P, 1, H)), positions_1P, inv_freq_J=inv_freq_J)[0, :, 0].sum(-1) / H
    return {
        "cos_PJ": rotated_PJH[:, jnp.arange(J), jnp.arange(J)],
        "sin_PJ": rotated_PJH[:, jnp.arange(J), jnp.arange(J) + J],
        "distance_X": -jnp.arange(P),
        "score_X": score_X,
    }


def _relative_arrays(table_RN, M: int, bidirectional: bool, max_distance: int) -> dict:
    k_1X = jnp.arange(2 * M + 1 if bidirectional else M + 1)[None]
    distance_X = k_1X[0] - M
    bucket_X = ops.relative_position_bucket(
        distance_X, bidirectional=bidirectional, num_buckets=table_RN.shape[0], max_distance=max_distance
    )
    bias_1N1X = ops.relative_position_bias(
        jnp.asarray(table_RN), jnp.full((1, 1), M), k_1X, bidirectional=bidirectional, max_distance=max_distance
    )
    return {"distance_X": distance_X, "bucket_X": bucket_X, "bias_NX": bias_1N1X[0, :, 0]}


def _heads_legend(ax, N: int) -> None:
    if N <= 8:
        ax.legend(fontsize=7, ncol=2 if N > 4 else 1)


def _draw_position_plot(plt, name: str, a: dict, cfg: ModelConfig, source: str):
    if name == "rope":
        fig, (circle, left, right) = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [3, 4, 4]})
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if name == "sinusoidal":
        im = left.imshow(a["table_PD"], aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
        left.set(title="sinusoidal table", xlabel="dimension (sin, cos interleaved; slower to the right)",
                 ylabel="position")
        fig.colorbar(im, ax=left)
        im = right.imshow(a["similarity_PP"], cmap="viridis", interpolation="nearest")
        right.set(title="cosine similarity: depends on distance only", xlabel="position", ylabel="position")
        fig.colorbar(im, ax=right)
        title = f"sinusoidal positions, d_model={cfg.d_model} (fixed: no parameters)"
    elif name.startswith("learned_"):
        table = a["table_PD"]
        v = float(np.abs(table).max()) or 1.0
        im = left.imshow(table, aspect="auto", cmap="RdBu", vmin=-v, vmax=v, interpolation="nearest")
        left.set(title="learned table", xlabel="dimension", ylabel="position")
        fig.colorbar(im, ax=left)
        im = right.imshow(a["similarity_PP"], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        right.set(title="position-to-position cosine similarity", xlabel="position", ylabel="position")
        fig.colorbar(im, ax=right)
        title = f"learned positions ({name.split('_', 1)[1]} stack), {source}"
    elif name == "rope":
        J = a["cos_PJ"].shape[1]
        shown = min(len(a["cos_PJ"]), 12)
        for j in sorted({0, J // 4, J // 2}):
            circle.plot(a["cos_PJ"][:shown, j], a["sin_PJ"][:shown, j], "o-", ms=3, label=f"pair {j}")
        circle.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="0.8"))
        circle.set(title=f"pair (1, 0) at positions 0..{shown - 1}", aspect="equal", xlim=(-1.15, 1.15),
                   ylim=(-1.15, 1.15), xticks=[-1, 0, 1], yticks=[-1, 0, 1])
        circle.legend(fontsize=7, loc="lower left")
        im = left.imshow(a["cos_PJ"], aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
        left.set(title="cos of each pair's rotation angle", xlabel="dimension pair j (slower to the right)",
                 ylabel="position")
        fig.colorbar(im, ax=left)
        right.plot(a["distance_X"], a["score_X"])
        right.axhline(0, color="0.7", lw=0.8)
        right.set(title="q.k / H for all-ones q, k: a function of distance", xlabel="key - query position",
                  ylabel="score")
        scaled = "" if cfg.rope_scaling is None else f", {cfg.rope_scaling.kind} scaling x{cfg.rope_scaling.factor:g}"
        title = f"RoPE, head dim {cfg.dim_per_head}, theta={cfg.rope_theta:g}{scaled} (fixed: no parameters)"
    elif name.startswith("relative_"):
        stack = name.split("_", 1)[1]
        left.step(a["distance_X"], a["bucket_X"], where="mid")
        left.axvline(0, color="0.7", lw=0.8)
        kind = "bidirectional" if stack == "encoder" else "causal: past only"
        left.set(title=f"bucket of each offset ({kind})", xlabel="key - query position", ylabel="bucket")
        for h, row in enumerate(a["bias_NX"]):
            right.step(a["distance_X"], row, where="mid", label=f"head {h}")
        right.axvline(0, color="0.7", lw=0.8)
        right.set(title="learned bias per head", xlabel="key - query position", ylabel="added to the logit")
        _heads_legend(right, a["bias_NX"].shape[0])
        # Buckets are exact near 0 and log-spaced beyond: a symmetric log axis shows both.
        exact = cfg.relative_buckets // (4 if stack == "encoder" else 2)
        for ax in (left, right):
            ax.set_xscale("symlog", linthresh=max(exact, 1), linscale=1.5)
            ax.set_xlim(a["distance_X"][0], a["distance_X"][-1] + 0.5)
        title = (f"T5 relative positions ({stack} stack), {cfg.relative_buckets} buckets, "
                 f"max distance {cfg.relative_max_distance}, {source}")
    elif name == "alibi":
        for h, row in enumerate(a["bias_NX"]):
            left.plot(a["distance_X"], row, label=f"head {h}: slope {a['slopes_N'][h]:.3g}")
        left.set(title="bias per head", xlabel="key - query position", ylabel="added to the logit")
        _heads_legend(left, a["bias_NX"].shape[0])
        T = min(len(a["distance_X"]), 32)
        d_TT = np.arange(T)[:, None] - np.arange(T)[None, :]
        grid = -a["slopes_N"][0] * np.abs(d_TT).astype(np.float32)
        if cfg.family == "decoder":
            grid = np.where(d_TT >= 0, grid, np.nan)  # the causal mask hides the future
        im = right.imshow(grid, cmap="viridis", interpolation="nearest")
        right.set(title=f"head 0 over the first {T} positions", xlabel="key position", ylabel="query position")
        fig.colorbar(im, ax=right)
        title = f"ALiBi, {cfg.num_heads} heads (fixed: no parameters)"
    else:
        raise ValueError(f"no plot named {name!r}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_positions(
    cfg: ModelConfig,
    out_dir,
    params: Optional[dict] = None,
    *,
    source: Optional[str] = None,
    length: Optional[int] = None,
) -> list[pathlib.Path]:
    """Write the position-encoding plots of `cfg` to out_dir as PNGs; return their paths.

    One file per entry of `position_arrays` (which documents what each shows):
    sinusoidal.png, learned_<stack>.png, rope.png, relative_<stack>.png or alibi.png.
    `params` supplies learned and T5 tables (checkpoint.load_params, hf.load); without
    them a fresh init is drawn and the titles say so. `source` names where params came
    from in the titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = position_arrays(cfg, params, length=length)
    source = FRESH_INIT if params is None else (source or "given parameters")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, a in arrays.items():
        fig = _draw_position_plot(plt, name, a, cfg, source)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
