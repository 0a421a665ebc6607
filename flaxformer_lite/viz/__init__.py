"""Attention and position-encoding plots (plots.py) and the `viz` command (commands.py).

    ffl.viz.visualize(cfg.model, params, tokenizer, "The quick brown fox", "out/")
    ffl.viz.plot_positions(cfg.model, "out/", params)

The public names are imported on first use (PEP 562), so `flaxformer-lite viz --help`
reaches commands.py without starting JAX.
"""

from flaxformer_lite import lazy_exports

_PUBLIC = {name: ("flaxformer_lite.viz.plots", name) for name in (
    "FRESH_INIT", "attention_maps", "plot_heads", "plot_positions", "position_arrays", "render_html", "visualize",
)}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _PUBLIC)
