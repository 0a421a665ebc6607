"""Metric summaries, WORKDIR/metrics.jsonl, TensorBoard events and the loss-curve PNG."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Mapping, Optional

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_CURVE_FILE = "loss_curve.png"


def add_sums(total: Mapping[str, float], sums: Mapping[str, float]) -> dict[str, float]:
    """Key-wise sum of two dicts of step sums."""
    return {k: float(total.get(k, 0.0)) + float(v) for k, v in sums.items()}


def summarize(sums: Mapping[str, float], *, bytes_are_tokens: bool, prefix: str = "") -> dict[str, float]:
    """Means from step sums: loss (nats a target token, no smoothing), perplexity, accuracy,
    bits_per_byte (byte tokenizers, where a target token is a byte or EOS), z_loss and
    seq_accuracy (exact-match sequences, seq2seq objectives) where their sums are present."""
    weight = max(float(sums["weight_sum"]), 1.0)
    loss = float(sums["loss_sum"]) / weight
    out = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),  # capped: exp overflows a float past ~709
        "accuracy": float(sums["correct_sum"]) / weight,
    }
    if bytes_are_tokens:
        out["bits_per_byte"] = loss / math.log(2.0)
    if float(sums.get("z_loss_sum", 0.0)):
        out["z_loss"] = float(sums["z_loss_sum"]) / weight
    if "seq_count" in sums:
        out["seq_accuracy"] = float(sums["seq_correct_sum"]) / max(float(sums["seq_count"]), 1.0)
    return {prefix + k: v for k, v in out.items()}


def baselines(batches: list[dict[str, np.ndarray]], objective: str) -> dict[str, float]:
    """What a model that ignores its input scores on these (evaluation) batches.

    classification: the majority class's share of the real rows. Token objectives: the
    best constant prediction (the most frequent target) and the entropy of the target
    distribution, in nats. Both are computed on the batches themselves, so they bound
    any unigram model fitted on training data from above (accuracy) and below (loss).
    """
    if objective == "classification":
        labels = np.concatenate([b["label"][b["segment_ids"][:, 0] > 0] for b in batches])
        counts = np.bincount(labels)
        return {"baseline_majority_accuracy": float(counts.max() / counts.sum())}
    targets = np.concatenate([b["labels"][b["weights"] > 0] for b in batches])
    p = np.bincount(targets) / len(targets)
    p = p[p > 0]
    return {
        "baseline_unigram_accuracy": float(p.max()),
        "baseline_unigram_loss": float(-(p * np.log(p)).sum()),
    }


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl (empty if there is none)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends {"step": s, name: value, ...} lines to metrics.jsonl and TensorBoard scalars.

    `resume_step`: records after it (written by a run that died before its next
    checkpoint) are dropped, so a resumed run's file reads as one uninterrupted run;
    TensorBoard is told the same through its purge_step.
    """

    def __init__(self, workdir: str | pathlib.Path, *, resume_step: Optional[int] = None):
        from tensorboardX import SummaryWriter  # deferred: only the writing process needs it

        self.path = pathlib.Path(workdir) / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
        self._file = self.path.open("a")
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(str(pathlib.Path(workdir) / TENSORBOARD_DIR), purge_step=purge)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """One record: a line of JSON (flushed at once) and a TensorBoard scalar per value."""
        record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            self._tb.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def plot_loss_curve(workdir: str | pathlib.Path) -> pathlib.Path:
    """WORKDIR/loss_curve.png: training loss and eval_loss against step."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title(pathlib.Path(workdir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = pathlib.Path(workdir) / LOSS_CURVE_FILE
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
