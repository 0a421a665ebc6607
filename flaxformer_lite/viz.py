"""Attention visualization: per-layer head grids (PNG) and an interactive head view (HTML).

    flaxformer-lite viz --workdir runs/gpt_tiny --text "The quick brown fox" --out viz/

The HTML page is self-contained (no network): pick the attention (encoder self,
decoder self, cross), the layer and a head (or the mean over heads); hover a token on
the left to see where it attends on the right, as in BertViz's head view (Vig 2019).
"""

from __future__ import annotations

import argparse
import html
import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import checkpoint
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.models import build_model

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


def add_viz_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run directory (config.yaml + checkpoints)")
    source.add_argument("--hf", help="a local HuggingFace model folder (config.json + safetensors)")
    parser.add_argument("--text", required=True, help="the input text")
    parser.add_argument("--target", default=None, help="decoder text (encoder-decoder models)")
    parser.add_argument("--out", required=True, help="folder for the PNGs and index.html")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def run_viz(args: argparse.Namespace) -> int:
    from flaxformer_lite import data

    if args.workdir:
        run_cfg, params = checkpoint.load_params(args.workdir, step=args.step)
        cfg, tokenizer = run_cfg.model, data.load_tokenizer(run_cfg.data.tokenizer)
    else:
        from flaxformer_lite.interop import hf

        cfg, params = hf.load(args.hf)
        tokenizer = data.load_tokenizer(args.hf)
    params = jax.tree.map(jnp.asarray, params)
    written = visualize(cfg, params, tokenizer, args.text, args.out, target=args.target)
    print(f"wrote {len(written)} files to {args.out}; open {pathlib.Path(args.out) / 'index.html'}")
    return 0
