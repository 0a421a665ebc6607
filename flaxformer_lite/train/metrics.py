"""Metric summaries, WORKDIR/metrics.jsonl, TensorBoard events and the loss-curve PNG."""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import socket
import time
import warnings
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from flaxformer_lite.config import ConfigError
from flaxformer_lite.models import flops
from flaxformer_lite.runtime import host

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_CURVE_FILE = "loss_curve.png"


def add_sums(total: Mapping[str, float], sums: Mapping[str, float]) -> dict[str, float]:
    """Key-wise sum of two dicts of step sums."""
    return {k: float(total.get(k, 0.0)) + float(v) for k, v in sums.items()}


def summarize(sums: Mapping[str, float], *, bytes_are_tokens: bool, prefix: str = "") -> dict[str, float]:
    """Means from step sums: loss (nats a target token, no smoothing), perplexity, accuracy,
    bits_per_byte (byte tokenizers, where a target token is a byte or EOS), z_loss and
    seq_accuracy (exact-match sequences, seq2seq objectives) where their sums are present.
    DPO's sums (a weight a pair) give loss, reward_accuracy, reward_margin and the policy's
    mean chosen_logp and rejected_logp instead; GRPO's (a weight a completion, with the
    rollouts' host sums) loss, reward_mean, reward_std, kl, clipped_fraction and
    rollout_logprob_gap (means over sampled tokens), completion_len and
    rollout_tokens_per_s."""
    weight = max(float(sums["weight_sum"]), 1.0)
    loss = float(sums["loss_sum"]) / weight
    if "logprob_gap_sum" in sums:
        tokens, rewards = max(float(sums["completion_tokens"]), 1.0), max(float(sums["reward_count"]), 1.0)
        mean = float(sums["reward_sum"]) / rewards
        out = {"loss": loss, "reward_mean": mean,
               "reward_std": math.sqrt(max(float(sums["reward_sq_sum"]) / rewards - mean**2, 0.0)),
               "kl": float(sums["kl_sum"]) / tokens, "clipped_fraction": float(sums["clipped_sum"]) / tokens,
               "rollout_logprob_gap": float(sums["logprob_gap_sum"]) / tokens,
               "completion_len": float(sums["completion_tokens"]) / weight,
               "rollout_tokens_per_s": float(sums["rollout_tokens"]) / max(float(sums["rollout_seconds"]), 1e-9)}
        return {prefix + k: v for k, v in out.items()}
    if "reward_margin_sum" in sums:
        means = {"reward_accuracy": "correct_sum", "reward_margin": "reward_margin_sum",
                 "chosen_logp": "chosen_logp_sum", "rejected_logp": "rejected_logp_sum"}
        out = {"loss": loss, **{k: float(sums[v]) / weight for k, v in means.items()}}
        return {prefix + k: v for k, v in out.items()}
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


class LogWindow:
    """The training steps since the last log record: their sums stay on the device until
    `close` fetches them all at once, which is the loop's only wait for the device
    between checkpoints. Tracks tokens seen and throughput; MFU uses models/flops.py's formula.

    The window of the run's first step (which compiles) is timed from that step's end,
    without its tokens, so throughput and MFU measure steady-state steps only.

    A run that stops between log steps closes its window early; a checkpoint of that
    step keeps the window's sums (`closed`), and the resumed run passes them back as
    `reopened`: its first record then covers the same steps as an uninterrupted run's
    (and its tokens count once), while their non-finite flags, already checked, are
    not returned again. Their time is not known, so they are left out of the timing.
    """

    def __init__(self, *, bytes_are_tokens: bool, flops_per_token: float, peak_flops: float, tokens_seen: float,
                 reopened: list[dict[str, float]] = ()):
        self.bytes_are_tokens = bytes_are_tokens
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        carried = sum(float(s["token_count"]) for s in reopened)
        self.tokens_seen = tokens_seen - carried  # tokens_seen counts them; close() adds them again
        self.train_seconds = self.train_tokens = 0.0
        self.closed: list[dict[str, float]] = []  # the per-step sums of the window close() closed last
        self._sums: list = list(reopened)
        self._reopened = len(reopened)
        self._start, self._untimed_tokens = time.perf_counter(), carried

    def __len__(self) -> int:
        return len(self._sums)

    def add(self, step_sums: Mapping[str, jax.Array], *, compiled: bool = False) -> None:
        """One step's sums (device arrays). compiled: this step compiled; do not time it."""
        self._sums.append(step_sums)
        if compiled:
            self._untimed_tokens += float(jax.device_get(step_sums["token_count"]))
            self._start = time.perf_counter()

    def pause(self, seconds: float) -> None:
        """Leave `seconds` spent outside training steps (eval, saves) out of the timing."""
        self._start += seconds

    def close(self) -> tuple[dict[str, float], list[float]]:
        """(log record, 0/1 non-finite flag of each step the window added since it was
        opened or reopened); starts a new window.

        The record's loss, accuracy and grad_norm are over the window's finite steps only
        (absent if it has none); nonfinite_steps counts the others.
        """
        fetched = jax.device_get(self._sums)
        self.closed = [{k: float(v) for k, v in s.items()} for s in fetched]
        flags = [float(s["nonfinite"]) for s in fetched]
        finite = [s for s, f in zip(fetched, flags) if not f]
        record: dict[str, float] = {}
        if finite:
            sums: dict[str, float] = {}
            for s in finite:
                sums = add_sums(sums, s)
            record = summarize(sums, bytes_are_tokens=self.bytes_are_tokens)
            record.pop("perplexity", None)  # of a moving model: eval_perplexity is the one to read
            record["grad_norm"] = sums["grad_norm"] / len(finite)
        record["nonfinite_steps"] = sum(flags)
        record["learning_rate"] = float(fetched[-1]["learning_rate"])
        tokens = sum(float(s["token_count"]) for s in fetched)
        self.tokens_seen += tokens
        record["tokens"] = self.tokens_seen
        record["flops_per_token"] = self.flops_per_token
        timed_tokens = tokens - self._untimed_tokens
        if timed_tokens:
            seconds = time.perf_counter() - self._start
            record["tokens_per_s"] = timed_tokens / seconds
            record["mfu"] = flops.mfu(record["tokens_per_s"], self.flops_per_token, self.peak_flops)
            self.train_seconds += seconds
            self.train_tokens += timed_tokens
        checked, self._reopened = self._reopened, 0
        self._sums, self._start, self._untimed_tokens = [], time.perf_counter(), 0.0
        return record, flags[checked:]

    def mean_throughput(self) -> dict[str, float]:
        """train_tokens_per_s and train_mfu over every timed window (empty if none)."""
        if not self.train_seconds:
            return {}
        rate = self.train_tokens / self.train_seconds
        return {"train_tokens_per_s": rate, "train_mfu": flops.mfu(rate, self.flops_per_token, self.peak_flops)}


def baselines(batches: list[dict[str, np.ndarray]], objective: str) -> dict[str, float]:
    """What a model that ignores its input scores on these (evaluation) batches.

    classification: the majority class's share of the real rows. Token objectives: the
    best constant prediction (the most frequent target) and the entropy of the target
    distribution, in nats. Both are computed on the batches themselves, so they bound
    any unigram model fitted on training data from above (accuracy) and below (loss).
    """
    if objective in ("dpo", "grpo"):  # a preference or a reward, not a token to predict: no input-blind baseline
        return {}
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


PEAK_FLOPS_FILE = "peak_flops.json"  # under runtime.host.cache_root(): measured peaks by machine, device and dtype
# Dense matmul peaks from the vendors' datasheets, FLOP/s, by a piece of jax's device_kind
# (the first that fits: "TPU v5 lite" is v5e, "TPU v5" v5p) and the compute dtype: MFU
# against the figure everyone quotes for the chip.
DATASHEET_PEAK_FLOPS = {
    ("H100 PCIe", "bfloat16"): 756e12, ("H100 PCIe", "float16"): 756e12, ("H100 PCIe", "float32"): 51e12,
    ("H100", "bfloat16"): 989e12, ("H100", "float16"): 989e12, ("H100", "float32"): 67e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float16"): 989e12, ("H200", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float16"): 312e12, ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12, ("TPU v5 lite", "bfloat16"): 197e12, ("TPU v5", "bfloat16"): 459e12,
    ("TPU v6 lite", "bfloat16"): 918e12,
}


def _device_kind() -> str:
    return jax.devices()[0].device_kind


def peak_flops(cfg) -> tuple[float, str]:
    """(FLOP/s that MFU divides by, where it comes from), the same for every run on a machine:
    train.peak_flops when set; else the datasheet figure of a known accelerator
    (DATASHEET_PEAK_FLOPS); else a square matmul at the compute dtype, timed once per
    machine and kept in cache_root()/peak_flops.json, so that runs on one machine compare
    (a figure measured by each run moved with the load of the moment)."""
    if cfg.train.peak_flops is not None:
        return cfg.train.peak_flops, "train.peak_flops"
    kind, dtype = _device_kind(), cfg.model.dtype
    for (piece, table_dtype), value in DATASHEET_PEAK_FLOPS.items():
        if piece in kind and table_dtype == dtype:
            return value, f"datasheet ({kind}, {dtype})"
    path = host.cache_root() / PEAK_FLOPS_FILE
    key = f"{socket.gethostname()}/{jax.default_backend()}/{kind}/{dtype}"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: measured again and rewritten
        cached = {}
    entry = cached.get(key) if isinstance(cached, dict) else None
    if not (isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0):
        entry = {"flops": flops.matmul_peak_flops(dtype), "measured": datetime.date.today().isoformat()}
        cached = {**(cached if isinstance(cached, dict) else {}), key: entry}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # several processes may write at once
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(cached, indent=2) + "\n")
            tmp.replace(path)
        except OSError as e:
            warnings.warn(f"could not keep the measured peak in {path}: {e}; the next run measures again", stacklevel=2)
        finally:
            tmp.unlink(missing_ok=True)
    return float(entry["flops"]), f"measured matmul ({kind}, {dtype}, {entry['measured']}), kept in {path}"


def strict(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None, so that json.dumps
    writes strict JSON (null) that every parser reads."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """json.dumps of strict(value); refuses to write NaN or Infinity."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def replace_file(path: str | pathlib.Path, write) -> None:
    """Make `path` by calling write(temporary path), then renaming: a failed write (a full
    disk) leaves the old file whole and no partial one behind."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl (empty if there is none).

    A half-written last line, as a process killed mid-write leaves, is skipped with a
    warning; a damaged line elsewhere (not a JSON object with a step) is a ConfigError
    naming the file and line.
    """
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record")
            records.append(record)
        except ValueError:
            if number < len(lines):
                raise ConfigError(
                    f"{path}:{number}: not a JSON record with a step ({line[:40]!r}); delete or repair that line"
                ) from None
            warnings.warn(f"{path}:{number}: skipping a half-written last line {line[:40]!r}", stacklevel=2)
    return records


class MetricsWriter:
    """Appends {"step": s, name: value, ...} lines to metrics.jsonl and TensorBoard scalars.

    Both are written and flushed in the calling thread, so a full disk or an I/O error
    raises OSError from `write` at once. (tensorboardX's SummaryWriter writes from a
    thread that dies on such an error, after which its bounded queue blocks the caller
    forever.) After an error the writer writes nothing more.

    `resume_step`: records after it (written by a run that died before its next
    checkpoint) are dropped, and so are the records at it for which `drop_at_resume`
    is true (ones an uninterrupted run would not write there: a stop between log steps
    closed the log window early), so a resumed run's file reads as one uninterrupted
    run; TensorBoard is told the same with a purge event, as SummaryWriter's purge_step
    does, and gets the records kept at `resume_step` again if it purged that step.
    """

    def __init__(self, workdir: str | pathlib.Path, *, resume_step: Optional[int] = None,
                 drop_at_resume: Callable[[dict], bool] = lambda record: False):
        from tensorboardX.event_file_writer import EventsWriter  # deferred: only the writing process needs it
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.path = pathlib.Path(workdir) / METRICS_FILE
        at_resume, purge = [], None if resume_step is None else resume_step + 1
        if resume_step is not None and self.path.exists():
            kept = []
            for r in read_metrics(workdir):
                if r["step"] == resume_step and drop_at_resume(r):
                    purge = resume_step
                elif r["step"] <= resume_step:
                    kept.append(r)
            at_resume = [r for r in kept if r["step"] == resume_step]
            text = "".join(dumps(r) + "\n" for r in kept)
            replace_file(self.path, lambda tmp: tmp.write_text(text))
        self._file = self.path.open("a")
        tb_dir = pathlib.Path(workdir) / TENSORBOARD_DIR
        tb_dir.mkdir(exist_ok=True)
        self._tb = EventsWriter(str(tb_dir / "events"))
        self.failed: Optional[OSError] = None
        if purge is not None:
            self._tb.write_event(Event(step=purge, wall_time=time.time(), file_version="brain.Event:2"))
            self._tb.write_event(Event(step=purge, wall_time=time.time(),
                                       session_log=SessionLog(status=SessionLog.START)))
        if purge == resume_step:
            for record in at_resume:
                self._write_scalars(record)
        self._tb.flush()

    def _write_scalars(self, record: Mapping[str, Any]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for name, value in record.items():
            if name != "step" and value is not None:
                self._tb.write_event(Event(step=record["step"], wall_time=time.time(), summary=scalar(name, value)))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """One record: a line of JSON and a TensorBoard scalar per value, both flushed."""
        if self.failed:
            return
        record = strict({"step": int(step), **{k: float(v) for k, v in values.items()}})
        try:
            self._file.write(dumps(record) + "\n")
            self._file.flush()
            self._write_scalars(record)
            self._tb.flush()
        except OSError as e:
            self.failed = e
            raise

    def close(self) -> None:
        """Close both files; raise the first OSError, unless `write` already raised one."""
        errors = []
        for f in (self._file, self._tb):
            try:
                f.close()
            except OSError as e:
                errors.append(e)
        if errors and not self.failed:
            raise errors[0]


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
    try:
        replace_file(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return out
