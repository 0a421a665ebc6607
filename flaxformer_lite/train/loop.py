"""The training loop: data, a sharded train state, steps, eval, metrics, checkpoints, samples.

    summary = train(cfg, "runs/gpt_tiny")                 # fresh run
    summary = train(cfg, "runs/gpt_tiny", resume=True)    # continue from the latest checkpoint
    summary = train(cfg, "runs/ft", init_from="runs/hf")  # start from another run's params
    summary = train(cfg, "runs/ft", init_from="path/to/hf_dir")  # or an HF folder's (cfg:
                                                   # interop.commands.hf_run_config)

data.objective=grpo makes each step's batch by sampling from the policy (train/grpo.py)
and evaluates by the reward of greedy completions of the validation prompts.

WORKDIR holds config.yaml, checkpoints/ (orbax: params, optimizer state, step, RNG and
the data iterator's position), metrics.jsonl, tensorboard/, loss_curve.png, samples.txt
(language models) and summary.json. Everything is validated, and all data is read,
before anything is written there, so bad input leaves no half-made run behind.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import pathlib
import time
import warnings
from typing import Any, Callable, Iterable, Optional

import flax.linen as nn
import grain
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from flaxformer_lite import data
from flaxformer_lite.config import Config, ConfigError
from flaxformer_lite.layers import lora
from flaxformer_lite.models import build_model, count_params, dummy_inputs, flops, init_params
from flaxformer_lite.runtime import checkpoint, host, parallel
from flaxformer_lite.train import grpo
from flaxformer_lite.train import metrics as metrics_lib
from flaxformer_lite.train import safety
from flaxformer_lite.train.optim import make_optimizer
from flaxformer_lite.train.step import (
    TrainState,
    check_objective,
    init_train_state,
    make_eval_step,
    make_train_step,
    needs_reference_copy,
    trainable,
)

Batch = dict[str, np.ndarray]

SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "samples.txt"
SAMPLE_PROMPT_TOKENS = 16  # each sample continues the start of a validation document
SAMPLE_TEMPERATURE = 0.8


@dataclasses.dataclass
class DataSetup:
    """A run's data: its config (classifier heads filled in from the labels), tokenizer,
    endless training dataset (None for evaluation only), evaluation batches and, for
    language models, the prompts of the samples printed at the end."""

    cfg: Config
    tokenizer: data.Tokenizer
    train: Optional[grain.IterDataset]
    eval_batches: list[Batch]
    sample_prompts: list[list[int]]
    split_sizes: Optional[tuple[int, int]] = None  # (training, validation) examples or documents
    records: Optional[dict[str, Any]] = None  # grpo: {"train", "val"} JSON lines the batches' `example` index

    @property
    def bytes_are_tokens(self) -> bool:
        """Targets are bytes (or EOS), so nats per token convert to bits per byte."""
        return isinstance(self.tokenizer, data.ByteTokenizer) and self.cfg.data.objective != "classification"


def _with_classifier(cfg: Config, num_classes: int) -> Config:
    """Set model.pooler and model.num_labels from the data, or check the config's value."""
    m = cfg.model
    if m.num_labels and m.num_labels != num_classes:
        raise ConfigError(
            f"model.num_labels={m.num_labels} but {cfg.data.corpus} has {num_classes} labels: "
            f"set model.num_labels={num_classes} (or 0 to take it from the data)"
        )
    model = dataclasses.replace(m, pooler=True, num_labels=num_classes)
    return dataclasses.replace(cfg, model=model)


def _warn_special_ids(cfg: Config, tokenizer: data.Tokenizer) -> None:
    """Warn when generation would use other EOS/PAD ids than the data was made with."""
    if cfg.model.family == "encoder":
        return
    for key, role in (("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):
        try:
            wanted = getattr(tokenizer, role)
        except data.DataError:  # the tokenizer has no such token: nothing to compare
            continue
        if wanted is not None and getattr(cfg.model, key) != wanted:
            warnings.warn(
                f"model.{key}={getattr(cfg.model, key)} but the tokenizer's {role} is {wanted}: "
                f"generation from this run will not stop or pad as the data does; set model.{key}={wanted}",
                stacklevel=3,
            )


def _adopt_store_split(cfg: Config, store: data.Store) -> Config:
    """A prepared DATADIR carries its split: the run uses it and records it in its config."""
    rule, d = store.manifest["split"], cfg.data
    if (d.split, d.val_fraction) == (rule["method"], rule["val_fraction"]):
        return cfg  # the hash split's seed is the one it was prepared with; data.seed still shuffles
    warnings.warn(
        f"{d.corpus} was prepared with split {rule['method']} (val_fraction {rule['val_fraction']}); the run "
        f"uses it, not data.split={d.split} data.val_fraction={d.val_fraction}; to split otherwise, prepare again "
        "with --split and --val-fraction", stacklevel=3)
    return dataclasses.replace(cfg, data=dataclasses.replace(d, split=rule["method"], val_fraction=rule["val_fraction"]))


def local_batch_size(cfg: Config) -> int:
    """This process's share of data.batch_size (which is the global batch)."""
    processes = jax.process_count()
    if cfg.data.batch_size % processes:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is the global batch and must divide evenly "
            f"over {processes} processes"
        )
    return cfg.data.batch_size // processes


def prepare_data(cfg: Config, *, train: bool = True) -> DataSetup:
    """Open the corpus, split it and check it; materialise the evaluation batches.

    Language-model objectives read a token store: data.corpus itself when it is a
    prepared DATADIR, else the cache's store of it, prepared on first use (process 0
    first, then the others find it). Seq2seq pairs and classification examples are
    small by nature and are read into memory. Raises data.DataError or ConfigError,
    naming the file, line or key, before any output exists.
    """
    d = cfg.data
    tokenizer = data.load_tokenizer(d.tokenizer)
    if d.objective in data.STREAM_OBJECTIVES:
        check_objective(cfg)
        _warn_special_ids(cfg, tokenizer)
        options = data.PrepareOptions(
            tokenizer=d.tokenizer, text_field=d.text_field, document_unit=d.document_unit,
            val_fraction=d.val_fraction, split=d.split, seed=d.seed,
        )
        open_store = functools.partial(
            data.corpus_store, d.corpus, options, vocab_size=cfg.model.vocab_size, verify=d.verify_shards,
            tokenizer=tokenizer, progress=jax.process_index() == 0,
        )
        if jax.process_count() > 1 and not data.is_store(d.corpus):
            if jax.process_index() == 0:
                open_store()
            multihost_utils.sync_global_devices("flaxformer_lite data cache")
        store = open_store()
        store.check_objective(d.objective, None)
        cfg = _adopt_store_split(cfg, store) if data.is_store(d.corpus) else cfg
        train_items, val_items = store.documents("train"), store.documents("val")
    elif d.objective in data.FINETUNE_OBJECTIVES:
        check_objective(cfg)
        template = data.tokenizer_template(d.tokenizer)
        if data.is_store(d.corpus):  # prepared: rendered and tokenized once, with its masks
            store = data.Store.open(d.corpus, verify=d.verify_shards)
            store.check_matches(tokenizer_identity=tokenizer.identity, tokenizer_spec=d.tokenizer,
                                vocab_size=cfg.model.vocab_size)
            store.check_objective(d.objective, data.chat_template_record(template))
            cfg = _adopt_store_split(cfg, store)
            train_items, val_items = store.documents("train"), store.documents("val")
        else:
            records = data.load_corpus(d.objective, d.corpus)
            train_items, val_items = data.split(records, d.val_fraction, seed=d.seed, method=d.split)
        if d.objective == "grpo" and jax.process_count() > 1:
            raise ConfigError(f"data.objective=grpo runs in one process (its Engine samples on one host); this "
                              f"run has {jax.process_count()}: start it as a single process")
    else:
        corpus = data.load_corpus(
            d.objective, d.corpus, text_field=d.text_field, label_field=d.label_field, document_unit=d.document_unit
        )
        if d.objective == "classification":
            cfg = _with_classifier(cfg, corpus.num_classes)
            corpus = corpus.examples
        check_objective(cfg)
        _warn_special_ids(cfg, tokenizer)
        train_items = val_items = None
        if corpus is not None:
            train_items, val_items = data.split(corpus, d.val_fraction, seed=d.seed, method=d.split)
    options = dict(
        tokenizer=tokenizer, batch_size=local_batch_size(cfg), seq_len=d.seq_len, target_len=d.target_len,
        seed=d.seed, vocab_size=cfg.model.vocab_size, shard_index=jax.process_index(),
        shard_count=jax.process_count(), pack=d.pack, mask_probability=d.mask_probability,
        noise_density=d.noise_density, mean_noise_span_length=d.mean_noise_span_length,
        synthetic_vocab=d.synthetic_vocab, shift_windows=d.shift_windows,
        chat_template=data.tokenizer_template(d.tokenizer) if d.objective in data.FINETUNE_OBJECTIVES else None,
        max_new_tokens=d.max_new_tokens,
    )
    train_ds = data.make_dataset(d.objective, train_items, train=True, **options) if train else None
    val_iter = iter(data.make_dataset(d.objective, val_items, train=False, **options))
    eval_batches = list(itertools.islice(val_iter, max(cfg.train.eval_batches, 1)))
    val_iter.close()
    prompts = []
    if d.objective == "causal_lm":
        openings = (tokenizer.decode(val_items.tokens(i)[: 4 * SAMPLE_PROMPT_TOKENS]) for i in range(len(val_items)))
        prompts = sample_prompts(openings, cfg.train.num_samples, tokenizer)
    sizes = None
    if train_items is not None and hasattr(train_items, "__len__") and hasattr(val_items, "__len__"):
        sizes = (len(train_items), len(val_items))
    records = {"train": train_items, "val": val_items} if d.objective == "grpo" else None
    return DataSetup(cfg, tokenizer, train_ds, eval_batches, prompts, sizes, records)


def sample_prompts(texts: Iterable[str], count: int, tokenizer: data.Tokenizer) -> list[list[int]]:
    """bos (if the tokenizer has one) + the first tokens of `count` held-out documents, preferring ones that read as
    prose: those that start with a letter and are at least 4 prompts long come first
    (a table border or a heading makes a poor prompt), then the rest, in corpus order.
    `texts` may be lazy (a store's openings) and only the first 4 prompts of each matter;
    it is read until `count` prose documents are found."""
    def prose(text: str) -> bool:
        return text[:1].isalpha() and len(tokenizer.encode(text)) >= 4 * SAMPLE_PROMPT_TOKENS

    chosen, others = [], []
    for text in texts:
        if len(chosen) == count:
            break
        (chosen if prose(text) else others).append(text)
        del others[count:]
    chosen += others[: count - len(chosen)]
    bos = data.leading_bos(tokenizer)
    start = [] if bos is None else [bos]
    return [start + tokenizer.encode(text)[: SAMPLE_PROMPT_TOKENS - len(start)] for text in chosen]


# ------------------------------------------------------------------------------- state


def state_shardings(cfg: Config, optimizer, mesh) -> tuple[Any, Any]:
    """(NamedSharding tree, abstract TrainState with those shardings), nothing allocated.

    The optimizer state is built over the *boxed* parameters, so its moments inherit
    each parameter's logical axis names and are sharded like it.
    """
    model = build_model(cfg.model)
    options = dict(reference=needs_reference_copy(cfg), adapters_only=bool(cfg.model.lora.rank))
    seed = cfg.train.seed

    def boxed_state():
        boxed = model.init(jax.random.key(0), *dummy_inputs(cfg.model))["params"]
        boxed = {"params": lora.quantize_base(boxed, cfg.model)}  # an int8 base: kernels + scales
        return init_train_state(boxed, optimizer, seed, **options)

    specs = nn.get_partition_spec(jax.eval_shape(boxed_state))
    shardings = parallel.logical_to_sharding(mesh, cfg.parallel, specs)
    shapes = jax.eval_shape(
        lambda: init_train_state(init_params(cfg.model, jax.random.key(0)), optimizer, seed, **options)
    )
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return shardings, abstract


@dataclasses.dataclass(frozen=True)
class Programs:
    """A run's jitted functions and the sharding of its state."""

    shardings: Any
    abstract: Any  # TrainState of jax.ShapeDtypeStruct with shardings (restore target)
    init: Callable  # key -> fresh TrainState
    init_with: Callable  # params -> TrainState around given params
    train_step: Callable  # (state, batch) -> (state, sums), state donated
    eval_step: Callable  # (params, batch, ref_params) -> sums


@functools.lru_cache(maxsize=4)
def programs(cfg: Config, mesh) -> Programs:
    """The jitted functions for (cfg, mesh); cached, so a process that trains the same
    config again (resuming, a notebook re-running a cell) compiles nothing twice."""
    optimizer = make_optimizer(cfg.train)
    model = build_model(cfg.model)
    shardings, abstract = state_shardings(cfg, optimizer, mesh)
    batch = parallel.batch_sharding(mesh)
    options = dict(reference=needs_reference_copy(cfg), adapters_only=bool(cfg.model.lora.rank))
    seed = cfg.train.seed
    return Programs(
        shardings=shardings,
        abstract=abstract,
        init=jax.jit(
            lambda key: init_train_state(init_params(cfg.model, key), optimizer, seed, **options),
            out_shardings=shardings,
        ),
        init_with=jax.jit(lambda p: init_train_state(p, optimizer, seed, **options), out_shardings=shardings,
                         donate_argnums=0),  # the given params become the state's: no second copy
        train_step=jax.jit(
            make_train_step(model, cfg, optimizer),
            in_shardings=(shardings, batch), out_shardings=(shardings, None), donate_argnums=0,
        ),
        eval_step=jax.jit(make_eval_step(model, cfg), in_shardings=(shardings.params, batch, shardings.ref_params)),
    )


def merge_params(fresh: Any, loaded: Any, source: str) -> tuple[Any, list[str], list[str]]:
    """`fresh` with every entry `loaded` also has (same path, same shape) replaced by it.

    Returns (params, names kept fresh, names of `loaded` not used). A shape mismatch is
    an error naming the parameter: the two models differ in more than their heads.
    """
    flat_loaded = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    kept_fresh, used = [], set()

    def pick(path, x):
        name = jax.tree_util.keystr(path)
        if name not in flat_loaded:
            kept_fresh.append(name)
            return x
        y = flat_loaded[name]
        if tuple(y.shape) != tuple(x.shape):
            raise ConfigError(
                f"{source}: parameter {name} has shape {tuple(y.shape)} there but "
                f"{tuple(x.shape)} in this model: make the model section match that run's config.yaml"
            )
        used.add(name)
        if jax.process_count() > 1 and isinstance(y, jax.Array) and len(y.sharding.device_set) == 1:
            y = np.asarray(y)  # a run's params, whole on one device of each process: placed from the host
        return y if y.dtype == x.dtype else y.astype(x.dtype)  # no copy where none is needed

    merged = jax.tree_util.tree_map_with_path(pick, fresh)
    return merged, kept_fresh, sorted(set(flat_loaded) - used)


# ------------------------------------------------------------------------------- helpers


def evaluate(eval_step: Callable, params: Any, batches: list[Batch], mesh, ref_params: Any = None) -> dict[str, float]:
    """Sum eval_step's sums over the batches (every process feeds the same count);
    ref_params: dpo's reference (TrainState.ref_params)."""
    count = len(batches)
    if jax.process_count() > 1:  # shards may differ in length; the rest feed empty batches
        count = int(np.max(multihost_utils.process_allgather(np.int32(count))))
    empty = {k: np.zeros_like(v) for k, v in batches[0].items()}
    device_sums = []
    for i in range(count):
        batch = parallel.shard_batch(mesh, batches[i] if i < len(batches) else empty)
        host.one_program_at_a_time(device_sums[-1] if device_sums else None)
        device_sums.append(eval_step(params, batch, ref_params))
    total: dict[str, float] = {}
    for sums in jax.device_get(device_sums):
        total = metrics_lib.add_sums(total, sums)
    return total


def _check_workdir(workdir: pathlib.Path, resume: bool, cfg: Config) -> None:
    """A fresh run needs a workdir without checkpoints; a resumed one the same model and data."""
    has_checkpoints = (workdir / checkpoint.CHECKPOINT_DIR).exists()
    if has_checkpoints and not resume:
        raise ConfigError(
            f"{workdir} already holds a run's checkpoints: pass --resume to continue it, or "
            "choose a new --workdir"
        )
    if resume and (workdir / checkpoint.CONFIG_FILE).exists():
        # Both with their paths as config.yaml holds them: the same file, however it is named.
        saved, cfg = checkpoint.portable(checkpoint.read_config(workdir), workdir), checkpoint.portable(cfg, workdir)
        for section in ("model", "data"):
            a, b = getattr(saved, section), getattr(cfg, section)
            diff = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
            if diff:
                keys = ", ".join(f"{section}.{k}" for k in diff)
                raise ConfigError(
                    f"--resume: {keys} differ from {workdir / checkpoint.CONFIG_FILE}; resume with "
                    "the run's own config (train.* may change)"
                )


def _every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


def _closes_window(cfg: Config, step: int) -> bool:
    """An uninterrupted run writes a training record at this step (log and checkpoint steps)."""
    return _every(step, cfg.train.log_every) or _every(step, cfg.train.checkpoint_every)


def _unwritten_at(cfg: Config, step: int, reopened: bool) -> Callable[[dict], bool]:
    """Which records at `step`, where a run stopped, an uninterrupted run would not have
    written: the training record of a log window the resumed run reopens, and an
    evaluation at a step that is not an eval step."""
    def unwritten(record: dict) -> bool:
        evaluation = all(k == "step" or k.startswith("eval_") for k in record)
        return not _every(step, cfg.train.eval_every) if evaluation else reopened
    return unwritten


def _out_of_time(started: float, budget: Optional[float]) -> bool:
    """True once `budget` seconds have passed since `started`."""
    return budget is not None and time.perf_counter() - started > budget


def _any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag or-ed over all processes (a collective when there are several)."""
    if jax.process_count() == 1:
        return flags
    gathered = multihost_utils.process_allgather(np.array(flags, dtype=np.bool_))
    return tuple(bool(x) for x in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0))


def _every_process(value: Any) -> list:
    """[value of process 0, value of process 1, ...] of a JSON value, on every process."""
    if jax.process_count() == 1:
        return [value]
    encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(encoded)))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(encoded)] = encoded
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


def _set_data_position(it, meta: dict) -> None:
    """Put this process's data iterator where it was at the checkpoint. Each process reads
    its own shard, so each has its own position; a checkpoint of another process count
    read other shards, and the data starts afresh (with a warning)."""
    states = meta.get("data_iterators") or [meta["data_iterator"]]  # before: process 0's only
    if len(states) == jax.process_count():
        it.set_state(states[jax.process_index()])
        return
    warnings.warn(
        f"the checkpoint was written by {len(states)} process(es) and this run has {jax.process_count()}: "
        "each reads another shard of the data now, which starts from its beginning", stacklevel=2,
    )


def _host_copy(tree: Any) -> Any:
    """A numpy copy of a (possibly sharded over several processes) tree, on every process."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


# ------------------------------------------------------------------------------- train


@dataclasses.dataclass
class _Run:
    """What the step loop reads and changes."""

    cfg: Config
    setup: DataSetup
    workdir: pathlib.Path
    mesh: Any
    prog: Programs
    mngr: Any
    saves: safety.Saves
    state: TrainState
    it: Any  # the training dataset's iterator (get_state/set_state)
    step: int
    start_step: int
    window: metrics_lib.LogWindow
    nonfinite: safety.NonFiniteSteps
    writer: Optional[metrics_lib.MetricsWriter]
    bar: tqdm
    log: Callable[[str], None]
    eval_record: dict = dataclasses.field(default_factory=dict)
    evaluated_at: int = -1  # the step of eval_record
    over_budget: bool = False
    write_failure: Optional[safety.SaveFailed] = None  # metrics.jsonl or TensorBoard could not be written
    data_position: Any = None  # the training iterator's state after the batch of `step`
    rollouts: Optional[grpo.Rollouts] = None  # grpo: the sampler that makes each step's batch


def train(
    cfg: Config,
    workdir: str | pathlib.Path,
    *,
    resume: bool = False,
    init_from: Optional[str | pathlib.Path] = None,
    stop_at: Optional[int] = None,
    resume_step: Optional[int] = None,
    init_adapter: Optional[str | pathlib.Path] = None,
) -> dict:
    """Train `cfg` into `workdir`; return the summary (also written to summary.json).

    resume: continue from the latest good checkpoint in workdir (params, optimizer
      state, step, RNG and data position), or start fresh if it has none yet.
    init_from: a run directory whose latest params initialise the model (fine-tuning,
      converted HF weights), or an HF folder; parameters it lacks, e.g. a new classifier,
      start fresh. The HF source (the folder, or the one the run kept) is copied into
      WORKDIR/hf, and a data.tokenizer pointing at the folder then points at the copy.
    stop_at: stop after this step, checkpointing first; a later resume continues
      exactly where it left off.
    resume_step: resume from this checkpoint step instead of the latest (say the best
      one before a divergence); the later steps are moved to
      WORKDIR/set_aside_checkpoints/, not deleted.
    init_adapter: with init_from an HF folder, a PEFT LoRA adapter folder for it whose
      adapters the run starts from (cfg.model.lora as the adapter has it:
      train.commands reads it).

    Raises safety.WorkdirBusy if another run holds workdir, and a safety.RunStopped
    (Preempted, NonFiniteStop, SaveFailed) when the run stops early; that is raised
    after the last checkpoint, metrics and summary are written.
    """
    started = time.perf_counter()
    workdir = pathlib.Path(workdir)
    resume = resume or resume_step is not None
    if resume and init_from is not None:
        raise ConfigError("--resume and --init-from exclude each other: a resumed run already has params")
    setup = prepare_data(cfg)
    cfg = setup.cfg
    rewards = grpo.Rewards(cfg.train) if cfg.data.objective == "grpo" else None  # loaded before any output
    main = jax.process_index() == 0
    log = tqdm.write if main else (lambda _msg: None)
    # Signals are caught from here to the summary, so one that comes late cuts nothing short.
    with safety.StopSignals() as signals, safety.WorkdirLock(workdir, enabled=main):
        _check_workdir(workdir, resume, cfg)
        mesh = parallel.make_mesh(cfg.parallel)
        _check_batch_split(cfg, mesh)
        loaded = None
        if init_from is not None:
            loaded = _load_init(init_from, cfg, mesh, init_adapter)
            shapes = jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))
            merge_params(shapes, loaded, f"--init-from {init_from}")  # shape errors before any output
            cfg = _keep_hf_source(init_from, workdir, cfg, main)
            setup = dataclasses.replace(setup, cfg=cfg)
        peak, peak_source = metrics_lib.peak_flops(cfg)

        with parallel.use_mesh(mesh, cfg.parallel):
            run = _start(cfg, setup, workdir, mesh, resume, resume_step, loaded, init_from, peak, log)
            last_step = cfg.train.num_steps if stop_at is None else min(stop_at, cfg.train.num_steps)
            try:
                if rewards is not None:
                    run.rollouts = grpo.Rollouts(cfg, setup.tokenizer, setup.records, run.state.params, rewards)
                stopped = _run_steps(run, signals, last_step, started)
            except BaseException:
                _abandon(run)
                raise
            finally:
                if run.rollouts is not None:
                    run.rollouts.close()
            stopped = _wait_for_saves(run, stopped)
            hint = _resume_hint(run, stopped)
            run.bar.close()
            run.it.close()
            _close_manager(run.mngr)
        summary = _finish(run, stopped, peak, peak_source, started)
    if stopped is not None:
        raise type(stopped)(f"{stopped}; {hint}", stopped.step)
    return summary


def _resume_hint(run: _Run, stopped: Optional[safety.RunStopped]) -> str:
    """How to go on: resume from the latest checkpoint; after non-finite steps, from the
    best healthy one, or afresh.

    A checkpoint is healthy when its eval_loss is finite and no higher than the run's
    first logged training loss (the model near its initialisation): a divergence raises
    the loss above that before it turns non-finite. Without a healthy evaluated
    checkpoint, the newest one saved before the non-finite steps is named (not
    evaluated); without one, a new run.
    """
    command = f"flaxformer-lite train --workdir {run.workdir} --resume"
    if not isinstance(stopped, safety.NonFiniteStop):
        return f"resume with: {command}"
    since = min(stopped.step, run.nonfinite.since or stopped.step)
    try:
        losses = [r["loss"] for r in metrics_lib.read_metrics(run.workdir) if r.get("loss") is not None]
    except (ConfigError, OSError):  # a damaged metrics.jsonl: no first loss to compare with
        losses = []
    ceiling = losses[0] if losses else math.inf
    steps = run.mngr.all_steps()
    healthy = {s: loss for s in steps if (loss := (run.mngr.metrics(s) or {}).get("eval_loss")) is not None
               and loss <= ceiling}
    if healthy:
        best = min(healthy, key=healthy.get)
        if best == run.mngr.latest_step():
            return f"resume with: {command}"
        what = f"the best checkpoint is {checkpoint.step_dir(run.mngr, best)} (eval_loss {healthy[best]:.4g})"
    else:
        none = "no checkpoint was evaluated" + (f" below the run's first training loss ({ceiling:.4g})" if losses else "")
        before = [s for s in steps if s < since]
        if not before:
            return (f"{none} or saved before the non-finite steps (from step {since}), so they may all hold the "
                    f"state that diverged: start a new run (another --workdir) with a lower train.learning_rate")
        best = max(before)
        what = (f"{none}; {checkpoint.step_dir(run.mngr, best)} is the newest saved before the non-finite steps "
                "(not evaluated: it may hold a diverging state too)")
    return (f"{what}; the later ones may hold the state that diverged: go on from it with a lower "
            f"train.learning_rate: {command} {best} --set train.learning_rate=...")


def _load_init(init_from, cfg: Config, mesh, adapter=None) -> Any:
    """Params to start from: an HF folder's (hf.load, in the run's layout and dtype), with a
    PEFT adapter's weights for it if one is given, or a run's."""
    from flaxformer_lite.interop import hf

    if hf.is_hf_folder(init_from):
        m = cfg.model
        base = m.lora.base_dtype if m.lora.rank else None  # a frozen base is read in its own dtype
        try:
            loaded = hf.load(init_from, mesh=mesh, parallel=cfg.parallel,  # placed sharded, tensor by tensor
                             scan_layers=m.scan_layers, quantize=base if base in lora.QUANTIZED else None,
                             param_dtype=base if base in ("float32", "bfloat16") else m.param_dtype)[1]
        except hf.HFError as e:
            raise ConfigError(f"--init-from {e}") from None
        if adapter is not None:
            from flaxformer_lite.interop import peft

            model_type = hf.read_config(init_from)["model_type"]
            loaded = lora.join(peft.adapter_params(m, adapter, model_type=model_type)[1], loaded)
    elif adapter is not None:
        raise ConfigError(f"--peft {adapter} goes with --init-from HF_DIR, the base the adapter was made for")
    else:
        loaded = checkpoint.load_params(init_from)[1]
    return lora.quantize_base(loaded, cfg.model)  # an int8 base (model.lora.base_dtype) is quantized here


def _describe_new(names: list[str], cfg: Config) -> str:
    """The parameter arrays a run starts fresh, in words: LoRA adapters counted with their
    pattern (a 7B model has hundreds), any other array (a new head) by name."""
    adapters = [n for n in names if n.endswith(tuple(f"{s}']" for s in lora.SUFFIXES))]  # keystr names
    others = [n for n in names if n not in adapters]
    parts = []
    if adapters:
        parts.append(f"{len(adapters)} new LoRA adapter arrays (*_lora_a, *_lora_b of rank {cfg.model.lora.rank} on "
                     f"{', '.join(cfg.model.lora.targets)})")
    if others or not adapters:
        parts.append(f"{len(others)} new parameter arrays {others}")
    return ", ".join(parts)


def _fresh_params(cfg: Config, prog: Programs, names: list[str]) -> dict[str, jax.Array]:
    """The named params (new heads, LoRA adapters) as a fresh run initialises them, on the
    run's shardings; only these are computed (XLA drops the rest of the initialisation),
    so a large loaded model is not initialised a second time beside itself."""
    if not names:
        return {}
    wanted = set(names)
    shardings = {jax.tree_util.keystr(path): s
                 for path, s in jax.tree_util.tree_flatten_with_path(prog.shardings.params)[0]}

    def init(key):
        flat = jax.tree_util.tree_flatten_with_path(init_params(cfg.model, key))[0]
        return {name: x for name, x in ((jax.tree_util.keystr(path), x) for path, x in flat) if name in wanted}

    out_shardings = {name: shardings[name] for name in wanted}
    return jax.jit(init, out_shardings=out_shardings)(jax.random.key(cfg.train.seed))


def _keep_hf_source(init_from, workdir: pathlib.Path, cfg: Config, main: bool) -> Config:
    """Copy the HF source's config.json and tokenizer files into WORKDIR/hf (from an HF folder,
    or from a run that kept one), with a record of where its weights are (hf.keep_source),
    so exports write the same family and tokenizer back and adapters name their base; a
    tokenizer read from the source folder is then read from the copy."""
    from flaxformer_lite.interop import hf

    init_from = pathlib.Path(init_from)
    source = init_from if hf.is_hf_folder(init_from) else init_from / hf.HF_SOURCE_DIR
    if not hf.is_hf_folder(source):
        return cfg
    kept = workdir / hf.HF_SOURCE_DIR
    if main:
        hf.keep_source(source, kept)
    if cfg.data.tokenizer != "byte" and pathlib.Path(cfg.data.tokenizer).resolve() == source.resolve():
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(kept)))
    return cfg


def _check_batch_split(cfg: Config, mesh) -> None:
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows, what = cfg.data.batch_size, f"data.batch_size={cfg.data.batch_size}"
    if cfg.data.objective == "grpo":  # a step trains on grpo_group completions of each prompt
        rows *= cfg.train.grpo_group
        what = f"data.batch_size x train.grpo_group = {rows}"
    if rows % (data_shards * cfg.train.grad_accum_steps):
        raise ConfigError(
            f"{what} must be a multiple of the {data_shards} data-parallel "
            f"devices times train.grad_accum_steps={cfg.train.grad_accum_steps}"
        )


def _start(cfg, setup, workdir, mesh, resume, resume_step, loaded, init_from, peak, log) -> _Run:
    """Write config.yaml; the train state (resumed, initialised from `loaded`, or fresh)."""
    prog = programs(cfg, mesh)
    main = jax.process_index() == 0
    mngr = checkpoint.manager(workdir, keep=cfg.train.keep_checkpoints, best_metric="eval_loss")
    if resume_step is not None:
        _set_aside_after(mngr, resume_step, log)
    it = iter(setup.train)
    start_step, tokens_seen, streak, reopened = 0, 0.0, 0, []
    restored = None
    if resume and mngr.latest_step() is not None:
        abstract = prog.abstract
        extra_target = {"opt_state": abstract.opt_state, "step": abstract.step, "rng": abstract.rng}
        if abstract.ref_params is not None:
            extra_target["ref_params"] = abstract.ref_params
        try:
            found, params, extra, meta = checkpoint.restore_good(
                mngr, params_target=abstract.params, extra_target=extra_target
            )
        except Exception as e:  # noqa: BLE001 - a step that passed its checks and does not load
            raise ConfigError(
                f"--resume: the checkpoints in {mngr.directory} do not fit this config's model or optimizer "
                f"({str(e).splitlines()[0][:300]}): resume with the run's own config"
            ) from None
        restored = None if found is None else (params, extra, meta)
        if found is None:
            log(f"no usable checkpoint in {workdir}: starting at step 0")
    if restored is not None:
        params, extra, meta = restored
        state = TrainState(step=extra["step"], params=params, opt_state=extra["opt_state"], rng=extra["rng"],
                           ref_params=extra.get("ref_params"))
        _set_data_position(it, meta)
        start_step, tokens_seen = int(state.step), float(meta["tokens"])
        streak = int(meta.get("nonfinite_streak", 0))
        reopened = meta.get("log_window", [])
        log(f"resumed {workdir} at step {start_step}")
    elif loaded is not None:
        params, kept_fresh, unused = merge_params(prog.abstract.params, loaded, f"--init-from {init_from}")
        fresh = _fresh_params(cfg, prog, kept_fresh)
        params = jax.tree_util.tree_map_with_path(lambda path, x: fresh.get(jax.tree_util.keystr(path), x), params)
        state = prog.init_with(jax.device_put(params, prog.shardings.params))
        log(f"initialised from {init_from}: {_describe_new(kept_fresh, cfg)}, {len(unused)} unused {unused}")
    else:
        state = prog.init(jax.random.key(cfg.train.seed))
    if main:  # after the restore: a config that does not fit the checkpoints is not written
        checkpoint.write_config(workdir, cfg)
    d = cfg.data
    flops_per_token = flops.training_flops_per_token(cfg.model, d.seq_len, d.target_len)
    lora_cfg = cfg.model.lora
    adapters = (f" ({count_params(trainable(prog.abstract.params, True)[0]):,} in LoRA adapters of rank "
                f"{lora_cfg.rank} on {', '.join(lora_cfg.targets)}, the rest frozen)") if lora_cfg.rank else ""
    examples = ""
    if setup.split_sizes is not None:
        unit = "examples" if d.objective in data.FINETUNE_OBJECTIVES else "items"
        examples = f" ({setup.split_sizes[0]:,} {unit} for training, {setup.split_sizes[1]:,} for validation)"
    log(f"{cfg.name}: {cfg.model.family}, {count_params(prog.abstract.params):,} parameters{adapters}, objective "
        f"{d.objective}{examples}, mesh {dict(mesh.shape)}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{flops_per_token / 1e6:.3g} MFLOPs/token, peak {peak / 1e12:.3g} TFLOP/s")
    tc = cfg.train
    if tc.warmup_steps is not None and tc.warmup_steps >= tc.num_steps:
        log(f"train.warmup_steps={tc.warmup_steps} is not below train.num_steps={tc.num_steps}: the learning rate "
            f"never reaches train.learning_rate={tc.learning_rate:g}; unset it (10% of num_steps) or lower it")
    return _Run(
        cfg=cfg, setup=setup, workdir=workdir, mesh=mesh, prog=prog, mngr=mngr, saves=safety.Saves(mngr),
        state=state, it=it, step=start_step, start_step=start_step,
        window=metrics_lib.LogWindow(
            bytes_are_tokens=setup.bytes_are_tokens, flops_per_token=flops_per_token, peak_flops=peak,
            tokens_seen=tokens_seen, reopened=reopened,
        ),
        nonfinite=safety.NonFiniteSteps(tc.nan_policy, tc.max_nonfinite_streak, streak),
        writer=metrics_lib.MetricsWriter(
            workdir, resume_step=start_step if resume else None,
            drop_at_resume=_unwritten_at(cfg, start_step, bool(reopened)),
        ) if main else None,
        bar=tqdm(total=tc.num_steps, initial=start_step, disable=not main, unit="step", dynamic_ncols=True),
        log=log,
    )


def _set_aside_after(mngr, step: int, log) -> None:
    """Move the checkpoints after `step` to WORKDIR/set_aside_checkpoints/."""
    steps = mngr.all_steps()
    if step not in steps:
        raise ConfigError(f"--resume {step}: {mngr.directory} has no checkpoint of step {step}; it has {sorted(steps)}")
    for later in sorted(s for s in steps if s > step):
        moved = checkpoint.quarantine(mngr, later, checkpoint.SET_ASIDE_DIR) if jax.process_index() == 0 else None
        checkpoint.sync(f"ffl_set_aside_{later}")
        mngr.reload()
        log(f"--resume {step}: moved checkpoint {later} to {moved}")


def _close_manager(mngr) -> None:
    try:
        mngr.close()
    except Exception:  # noqa: BLE001 - orbax re-raises a failed save, which Saves has reported
        pass


def _abandon(run: _Run) -> None:
    """On an unexpected error: settle the save in flight (safety.Saves.settle), save a
    last checkpoint (one process) and close the files, so that every complete checkpoint
    stays usable; never raises."""
    run.log(f"error at step {run.step}: {run.saves.settle()}{_last_checkpoint(run)}")
    try:
        run.saves.close()
    except Exception:  # noqa: BLE001 - settle and _last_checkpoint reported it
        pass
    _close_manager(run.mngr)
    if run.writer:
        try:
            run.writer.close()
        except OSError:
            pass
    run.bar.close()


def _last_checkpoint(run: _Run) -> str:
    """After an unexpected error, with one process: a checkpoint of the last step's state
    if it is newer than the latest checkpoint, still alive (not given to a step that
    failed) and finite; what became of it, in words. Several processes do not try: their
    peers may be gone, and a save is a collective."""
    if jax.process_count() > 1 or run.step in (run.start_step, run.saves.last_good):
        return ""
    if any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(run.state)):
        return f"; the state of step {run.step} went to the step that failed: no last checkpoint"
    try:  # dispatched ahead, it may be the failed step's own (unreadable) output
        jax.block_until_ready(run.state)
    except Exception:  # noqa: BLE001 - the error on its way up says what failed
        return f"; the state of step {run.step} is the output of the step that failed: no last checkpoint"
    try:
        if len(run.window):
            _log(run)  # its tokens and non-finite flags; the resumed run reopens the window
        failed = _save(run)
        if failed is None:
            run.saves.close()
    except Exception as e:  # noqa: BLE001 - the state itself may be what failed
        failed = e
    if failed is not None:
        why = str(failed) if isinstance(failed, safety.RunStopped) else safety.describe_io_error(failed)
        return f"; no last checkpoint of step {run.step}: {why}"
    return f"; a last checkpoint of step {run.step} was saved in {checkpoint.step_dir(run.mngr, run.step)}"


def _run_steps(run: _Run, signals: safety.StopSignals, last_step: int, started: float) -> Optional[safety.RunStopped]:
    """Train until last_step, the time budget or a reason to stop early (returned).

    Between checkpoints the loop waits for the device only at log steps, where it
    fetches the window's metrics (and, on a tuned CPU heap, for each step before the
    next: host.one_program_at_a_time); signals, the preemption sync point and failed
    saves are checked every step on the host.
    """
    tc = run.cfg.train
    running = None  # the last step dispatched
    while run.step < last_step:
        host_batch = next(run.it)
        position = run.it.get_state()  # not after a failed next(): a last checkpoint needs this one
        rollout_sums = {}
        if run.rollouts is not None:  # grpo: sample from the policy as it is after the last step
            host_batch, rollout_sums = run.rollouts.train_batch(run.state.params, host_batch, run.step + 1)
        batch = parallel.shard_batch(run.mesh, host_batch)
        # The batch is made while the last step runs; then the step goes when it is done.
        host.one_program_at_a_time(running)
        run.state, step_sums = run.prog.train_step(run.state, batch)
        running = step_sums
        step_sums = {**step_sums, **rollout_sums}
        run.step, run.data_position = run.step + 1, position
        step = run.step
        run.window.add(step_sums, compiled=step == run.start_step + 1)
        stop = signals.stop_requested(step, run.mngr)
        if jax.process_count() == 1:  # several processes learn of a failed save at the next save
            stop = stop or run.saves.poll()
        # Several processes must agree to stop for time, or for process 0's failed metrics
        # write, at the same step: they do so at log steps only, since agreeing is a
        # collective that waits for the step.
        write_failed = False
        if jax.process_count() == 1 or _every(step, tc.log_every):
            run.over_budget, write_failed = _any_process(
                _out_of_time(started, tc.time_budget_s), run.write_failure is not None
            )
        if _every(step, tc.log_every) or _every(step, tc.checkpoint_every) or stop or _final(run, last_step):
            # A checkpoint step closes the window too, so the token count it saves is exact.
            nonfinite_stop = _log(run)
            stop = stop or nonfinite_stop
        if write_failed or (jax.process_count() == 1 and run.write_failure):
            stop = stop or run.write_failure or safety.SaveFailed(
                f"process 0 could not write its metrics; stopped at step {step}", step
            )
        final = stop is not None or _final(run, last_step)
        if _every(step, tc.eval_every) or (final and not isinstance(stop, (safety.Preempted, safety.SaveFailed))):
            _evaluate(run)
        if _every(step, tc.checkpoint_every) or final:
            failed = _save(run)
            if isinstance(stop, safety.SaveFailed) and failed is not None:
                # This save was the last attempt after a failed write; if an earlier save
                # failed instead, the first failure's message names the intact checkpoint.
                last = f"; the last attempt, at step {step}, failed too" if failed.step == step else ""
                failed = safety.SaveFailed(f"{stop}{last}", stop.step)
            stop = failed or stop
        if stop is not None:
            return stop
        if run.over_budget:
            run.log(f"time budget of {tc.time_budget_s:.0f} s reached at step {step}")
            return None
    return None


def _final(run: _Run, last_step: int) -> bool:
    return run.step == last_step or run.over_budget


def _log(run: _Run) -> Optional[safety.RunStopped]:
    """Close the log window: a metrics record, the progress bar, the non-finite check."""
    record, flags = run.window.close()
    first = run.step - len(flags) + 1
    # The window's metrics are fetched, so its steps are complete: the bar counts them.
    run.bar.update(run.step - run.bar.n)
    # No step is running: hand back what the window left free (a save's buffers, say) on
    # a tuned heap; the next step faults its buffer in once.
    host.release_free_memory()
    if "tokens_per_s" in record:
        shown = {"tok_s": f"{record['tokens_per_s']:,.0f}", "mfu": f"{record['mfu']:.1%}"}
        run.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", **shown)
    _write_metrics(run, record)
    return run.nonfinite.check(first, flags)


def _write_metrics(run: _Run, values: dict) -> None:
    """A metrics record (process 0); a failed write is kept in run.write_failure."""
    if run.writer is None or run.writer.failed:
        return
    try:
        run.writer.write(run.step, values)
    except OSError as e:
        run.write_failure = safety.SaveFailed(
            f"could not write {run.writer.path} at step {run.step}: {safety.describe_io_error(e)}; "
            f"{run.saves.intact()}", run.step,
        )


def _evaluate(run: _Run) -> None:
    pause = time.perf_counter()
    if run.rollouts is not None:
        run.eval_record = run.rollouts.evaluate(run.state.params, run.setup.eval_batches)
    else:
        sums = evaluate(run.prog.eval_step, run.state.params, run.setup.eval_batches, run.mesh, run.state.ref_params)
        run.eval_record = metrics_lib.summarize(sums, bytes_are_tokens=run.setup.bytes_are_tokens, prefix="eval_")
    run.evaluated_at = run.step
    _write_metrics(run, run.eval_record)
    run.log(f"step {run.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in run.eval_record.items()))
    run.window.pause(time.perf_counter() - pause)


def _save(run: _Run) -> Optional[safety.RunStopped]:
    """Start the checkpoint of this step (with eval_loss, for best-checkpoint tracking,
    when this step was evaluated to a finite value)."""
    pause = time.perf_counter()
    eval_loss = run.eval_record.get("eval_loss")
    evaluated = run.evaluated_at == run.step and eval_loss is not None and math.isfinite(eval_loss)
    # A stop between log steps closed the log window early: the resumed run reopens it.
    early = not len(run.window) and not _closes_window(run.cfg, run.step)
    try:
        run.saves.save(
            run.step, run.state,
            meta={"data_iterators": _every_process(run.data_position), "step": run.step,
                  "tokens": run.window.tokens_seen,
                  "nonfinite_streak": run.nonfinite.streak,
                  "log_window": run.window.closed if early else []},
            metrics={"eval_loss": eval_loss} if evaluated else None,
        )
    except safety.RunStopped as e:
        return e
    finally:
        run.window.pause(time.perf_counter() - pause)
    return None


def _wait_for_saves(run: _Run, stopped: Optional[safety.RunStopped]) -> Optional[safety.RunStopped]:
    """Wait for the last checkpoint. After a failed background save this last one was
    the attempt to save what can be saved; the message says whether it worked."""
    try:
        run.saves.close()
    except safety.SaveFailed as e:
        if isinstance(stopped, safety.SaveFailed):
            return safety.SaveFailed(f"{stopped}; the last attempt, at step {run.step}, failed too", stopped.step)
        return e
    if stopped is not None and run.saves.last_good == run.step:
        what = "checkpoint saved"
        if isinstance(stopped, safety.SaveFailed):
            what = f"a last checkpoint of step {run.step} was saved"
        return type(stopped)(f"{stopped}; {what} in {checkpoint.step_dir(run.mngr, run.step)}", stopped.step)
    return stopped


def _finish(run: _Run, stopped: Optional[safety.RunStopped], peak: float, peak_source: str, started: float) -> dict:
    """summary.json (strict JSON), the loss curve and, at the end of a run, samples."""
    cfg, workdir = run.cfg, run.workdir
    summary = {
        "name": cfg.name,
        "step": run.step,
        "num_params": count_params(run.prog.abstract.params),
        "seconds": time.perf_counter() - started,
        **run.eval_record,
        **({"eval_step": run.evaluated_at} if run.eval_record else {}),
        **metrics_lib.baselines(run.setup.eval_batches, cfg.data.objective),
        **run.window.mean_throughput(),
        "flops_per_token": run.window.flops_per_token,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "host_malloc_tuned": host.malloc_tuned(),
    }
    if stopped is not None:
        summary["stopped"] = f"{type(stopped).__name__}: {stopped}"
    sampling = run.setup.sample_prompts and stopped is None and (run.step == cfg.train.num_steps or run.over_budget)
    host_params = _host_copy(run.state.params) if sampling else None
    if jax.process_index() == 0:
        try:
            run.writer.close()
            metrics_lib.plot_loss_curve(workdir)
            if sampling:
                summary["samples"] = write_samples(build_model(cfg.model), host_params, run.setup, workdir, run.log)
            text = metrics_lib.dumps(summary, indent=2) + "\n"
            metrics_lib.replace_file(workdir / SUMMARY_FILE, lambda tmp: tmp.write_text(text))
        except OSError as e:  # a full disk: the checkpoint matters, these files do not
            warnings.warn(f"could not write {workdir}'s summary files: {e}", stacklevel=2)
    return metrics_lib.strict(summary)


def write_samples(model, params, setup: DataSetup, workdir: pathlib.Path, log) -> list[str]:
    """Continue each sample prompt with flaxformer_lite.inference.decode.generate; write samples.txt."""
    from flaxformer_lite.inference.decode import generate  # deferred: only language models need it

    tc, tok = setup.cfg.train, setup.tokenizer
    longest = max(len(p) for p in setup.sample_prompts)
    out = generate(
        model, params, setup.sample_prompts,
        max_new_tokens=min(tc.sample_len, setup.cfg.model.max_len - longest),
        method="sample", temperature=SAMPLE_TEMPERATURE, seed=tc.seed,
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        stop_tokens=[i for i in tok.eos_ids if i < setup.cfg.model.vocab_size],
    )
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    samples = [
        tok.decode(prompt) + tok.decode(row[:n].tolist())
        for prompt, row, n in zip(setup.sample_prompts, tokens, lengths)
    ]
    text = "".join(f"--- sample {i} (prompt: {tok.decode(p)!r})\n{s}\n" for i, (p, s) in enumerate(zip(setup.sample_prompts, samples)))
    metrics_lib.replace_file(workdir / SAMPLES_FILE, lambda tmp: tmp.write_text(text))
    log(text)
    return samples
