"""`flaxformer-lite train` and `flaxformer-lite eval`.

Bad input (config, corpus, tokenizer, workdir) prints one `error: ...` line naming the
file, line or key, and exits with status 2 before anything is written; so does a workdir
that another live run holds. A run that stops early prints one `stopped: ...` line
saying where its checkpoint is and how to resume, and exits with (train/safety.py):

    3   train.nan_policy stopped it (non-finite loss, gradient or learning rate)
    74  a checkpoint could not be written (a full disk...)
    75  SIGTERM or SIGINT (preemption): resume with --resume

An unexpected error exits with 1 and its traceback; with several processes at once,
without waiting at JAX's shutdown barrier for peers that may be dead.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import traceback

from flaxformer_lite.errors import BAD_INPUT, EXIT_BAD_INPUT
from flaxformer_lite.runtime.flags import non_negative_int, positive_int


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flaxformer-lite train`."""
    parser.add_argument("--config", help="YAML run config, or a preset name (gpt_tiny); optional with "
                        "--init-from HF_DIR (fine-tuning defaults, config.FINE_TUNE_TRAIN), --init-from RUN_DIR "
                        "(that run's config) and --resume (WORKDIR's config)")
    parser.add_argument("--workdir", required=True, help="run directory: config, checkpoints, metrics")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.num_steps=100 model.num_layers=2")
    parser.add_argument("--resume", nargs="?", const=True, default=False, type=int, metavar="STEP",
                        help="continue from WORKDIR's latest checkpoint (a fresh start if it has none), or from "
                             "checkpoint STEP, setting the later ones aside")
    parser.add_argument("--init-from", metavar="DIR",
                        help="initialise parameters from another run directory, or from a local HF folder "
                        "(config.json + *.safetensors), whose model and tokenizer the run then uses")
    parser.add_argument("--peft", metavar="ADAPTER",
                        help="with --init-from HF_DIR: a PEFT LoRA adapter folder made for that base, which the run "
                        "goes on training: model.lora (rank, alpha, dropout, targets) and the adapters' weights come "
                        "from it (model.lora.base_dtype may still be set)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `flaxformer-lite eval`: a run's validation loss, or lm-eval tasks with --tasks."""
    parser.add_argument("--workdir", help="run directory to evaluate")
    parser.add_argument("--config", help="config whose data section to evaluate on (default: the run's own)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.eval_batches=50")
    parser.add_argument("--step", type=non_negative_int, help="checkpoint step (default: the latest)")
    harness = parser.add_argument_group("lm-eval tasks (needs the [eval] extra)")
    harness.add_argument("--tasks", help="comma-separated lm-eval task names (or your own YAML tasks' names with "
                         "--include-path), run on --workdir RUN or --hf DIR [--peft ADAPTER]")
    harness.add_argument("--hf", metavar="DIR", help="with --tasks: a local HuggingFace model folder")
    harness.add_argument("--peft", metavar="ADAPTER", help="with --hf: a PEFT LoRA adapter folder for that base")
    harness.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAML files")
    harness.add_argument("--num-fewshot", type=non_negative_int, help="few-shot examples (default: each task's own)")
    harness.add_argument("--limit", type=positive_int, help="documents per task (default: all)")
    harness.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass (default: 8)")
    harness.add_argument("--seed", type=int, default=0, help="lm-eval's seeds (few-shot sampling; default: 0)")
    harness.add_argument("--output", metavar="FILE", help="write lm-eval's results (metrics and per-document "
                         "records) here as JSON")


def check_backend(cfg) -> None:
    """Raise ConfigError for settings JAX's backend cannot run, before anything is written."""
    import jax

    from flaxformer_lite.config import ConfigError

    backend = jax.default_backend()
    if cfg.model.attention_impl == "cudnn" and backend != "gpu":
        raise ConfigError(f"model.attention_impl=cudnn needs an NVIDIA GPU, and JAX's backend is {backend!r}: "
                          "set model.attention_impl=auto (or xla)")


def _run_config(args: argparse.Namespace):
    """--config with --set; with --init-from HF_DIR, the model and tokenizer come from the
    folder; without --config, --init-from RUN_DIR (or --resume) takes that run's config."""
    from flaxformer_lite.config import ConfigError, load_config
    from flaxformer_lite.runtime import checkpoint

    if args.init_from and not args.resume:
        from flaxformer_lite.interop import hf

        if hf.is_hf_folder(args.init_from):
            from flaxformer_lite.interop.commands import hf_run_config

            try:
                model_cfg = hf.read_model_config(args.init_from)
            except hf.HFError as e:
                raise ConfigError(f"--init-from {e}") from None
            cfg = hf_run_config(args.init_from, model_cfg, config=args.config, overrides=args.set)
            cfg = _with_adapter(cfg, args) if args.peft else cfg
            return cfg if args.config else _memory_defaults(_lora_learning_rate(cfg, args.set), args.set)
        if not args.config:
            if not (pathlib.Path(args.init_from) / checkpoint.CONFIG_FILE).is_file():
                raise ConfigError(f"--init-from {args.init_from}: neither an HF folder (config.json + *.safetensors) "
                                  f"nor a run directory ({checkpoint.CONFIG_FILE} + checkpoints/)")
            return checkpoint.read_config(args.init_from, overrides=_objective_overrides(args.set))
    if args.peft:
        raise ConfigError(f"--peft {args.peft} goes with --init-from HF_DIR, the base the adapter was made for "
                          "(a resumed run or a run directory already holds its adapters)")
    if not args.config and args.resume and (pathlib.Path(args.workdir) / checkpoint.CONFIG_FILE).is_file():
        return checkpoint.read_config(args.workdir, overrides=args.set)
    if not args.config:
        raise ConfigError("train needs --config FILE (or a preset name), --init-from HF_DIR to fine-tune "
                          "an HF folder's model with fine-tuning defaults, or --init-from RUN_DIR to go on from a run")
    if checkpoint.is_run_config(args.config):  # its paths are relative to its run directory
        return checkpoint.read_config(pathlib.Path(args.config).parent, overrides=args.set)
    return load_config(args.config, overrides=args.set)


def _with_adapter(cfg, args):
    """--peft ADAPTER: model.lora as the adapter's adapter_config.json has it (rank, alpha,
    dropout, and targets from its tensors), checked against the base's shapes; the run's
    own model.lora.base_dtype stays."""
    import dataclasses

    from flaxformer_lite.config import ConfigError
    from flaxformer_lite.interop import hf, peft

    keys = [o.split("=", 1)[0].strip() for o in args.set]
    given = [k for k in keys if k.startswith("model.lora.") and k != "model.lora.base_dtype"]
    if given:
        raise ConfigError(f"--peft {args.peft} sets model.lora from its {peft.CONFIG_FILE}: drop --set "
                          f"{', '.join(given)} (model.lora.base_dtype may stay)")
    if cfg.model.scan_layers:
        raise ConfigError("--peft loads adapters onto unrolled layers: drop model.scan_layers=true")
    try:
        lora_cfg = peft.adapter_params(cfg.model, args.peft, model_type=hf.read_config(args.init_from)["model_type"])[0]
    except hf.HFError as e:
        raise ConfigError(f"--peft {e}") from None
    lora_cfg = dataclasses.replace(lora_cfg, base_dtype=cfg.model.lora.base_dtype)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=lora_cfg))


def _objective_overrides(overrides):
    """--init-from RUN_DIR's overrides: a run that goes on with an objective the chunked loss
    does not take (an sft run's config, chunked by the fine-tuning defaults, going on as
    dpo) leaves train.loss_chunk_size unset, unless --set gives it."""
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    given = {k.strip(): v.strip() for k, v in given.items()}
    objective = given.get("data.objective")
    if objective is not None and objective not in ("causal_lm", "sft") and "train.loss_chunk_size" not in given:
        return [*overrides, "train.loss_chunk_size=null"]
    return overrides


def _memory_defaults(cfg, overrides):
    """Fine-tuning defaults: config.FINE_TUNE_MEMORY's remat and chunked loss, each unless
    --set gives its key (the chunked loss only where the objective and model take it)."""
    import dataclasses

    from flaxformer_lite.config import FINE_TUNE_MEMORY

    given = {o.split("=", 1)[0].strip() for o in overrides}
    model, train = cfg.model, cfg.train
    if "model.remat_policy" not in given:
        model = dataclasses.replace(model, remat_policy=FINE_TUNE_MEMORY["model.remat_policy"])
    if ("train.loss_chunk_size" not in given and cfg.data.objective in ("causal_lm", "sft")
            and model.logits_softcap is None):
        train = dataclasses.replace(train, loss_chunk_size=FINE_TUNE_MEMORY["train.loss_chunk_size"])
    return dataclasses.replace(cfg, model=model, train=train)


def _lora_learning_rate(cfg, overrides):
    """Fine-tuning defaults with model.lora.rank set and no train.learning_rate given: the
    adapters' learning rate (config.FINE_TUNE_LORA_LEARNING_RATE), not full weights'."""
    import dataclasses

    from flaxformer_lite.config import FINE_TUNE_LORA_LEARNING_RATE

    if not cfg.model.lora.rank or any(o.split("=", 1)[0].strip() == "train.learning_rate" for o in overrides):
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=FINE_TUNE_LORA_LEARNING_RATE))


def run_train(args: argparse.Namespace) -> int:
    """Train; print the final evaluation (and samples, for language models)."""
    import jax

    from flaxformer_lite.runtime import parallel
    from flaxformer_lite.train.loop import train
    from flaxformer_lite.train.safety import RunStopped

    try:
        parallel.initialize_distributed()
        cfg = _run_config(args)
        check_backend(cfg)
        resume_step = None if isinstance(args.resume, bool) else args.resume
        summary = train(cfg, args.workdir, resume=bool(args.resume), init_from=args.init_from, resume_step=resume_step,
                        init_adapter=args.peft)
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except Exception:
        if jax.process_count() > 1:
            # At exit JAX's shutdown barrier waits for every process: a dead peer would hold
            # it for jax.distributed's heartbeat timeout (100 s), then abort. The run has
            # settled its checkpoints (loop.train), so this process leaves now.
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        raise
    shown = {k: v for k, v in summary.items() if k != "samples"}
    print(json.dumps(shown, indent=2))
    return 0


def _run_tasks(args: argparse.Namespace) -> int:
    """`eval --tasks`: lm-eval's table on stdout, its results JSON in --output."""
    from flaxformer_lite.config import ConfigError
    from flaxformer_lite.inference import commands as inference_commands

    if bool(args.workdir) == bool(args.hf):
        raise ConfigError("eval --tasks: pass one model: --workdir RUN or --hf DIR")
    if args.config or args.set:
        raise ConfigError("eval --tasks evaluates the model as it is: drop --config/--set (they pick the data "
                          "of a validation-loss eval)")
    if args.peft and not args.hf:
        raise ConfigError("--peft ADAPTER goes with --hf BASE_DIR, the model the adapter was trained on")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name, e.g. --tasks arc_easy,hellaswag")
    if args.include_path and not pathlib.Path(args.include_path).is_dir():
        raise ConfigError(f"--include-path {args.include_path}: no such folder of task YAML files")
    from flaxformer_lite.inference.evaluation import run_tasks
    from flaxformer_lite.interop import lm_eval

    source = argparse.Namespace(workdir=args.workdir, hf=args.hf, peft=args.peft, config=None, step=args.step,
                                seed=args.seed)
    model_cfg, params, tokenizer, folder = inference_commands.load_model(source)
    results = run_tasks(model_cfg, params, tokenizer, folder, tasks, include_path=args.include_path,
                        num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size, seed=args.seed)
    print(lm_eval.table(results))
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.output}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a run's checkpoint on its validation split; print and write WORKDIR/eval.json.
    With --tasks: lm-eval tasks on a run or an HF folder instead."""
    if args.tasks:
        return _run_tasks(args)
    if args.hf or args.peft or args.include_path:
        print("error: --hf, --peft and --include-path go with --tasks (a validation-loss eval reads --workdir)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.workdir:
        print("error: eval needs --workdir RUN (or --tasks T1,T2 with --workdir RUN or --hf DIR)", file=sys.stderr)
        return EXIT_BAD_INPUT
    import jax

    from flaxformer_lite.config import ConfigError, load_config
    from flaxformer_lite.models import build_model, init_params
    from flaxformer_lite.runtime import checkpoint, parallel
    from flaxformer_lite.train import metrics as metrics_lib
    from flaxformer_lite.train.loop import evaluate, merge_params, prepare_data
    from flaxformer_lite.train.step import make_eval_step

    workdir = pathlib.Path(args.workdir)
    try:
        parallel.initialize_distributed()
        config_path = args.config or workdir / checkpoint.CONFIG_FILE
        if not args.config or checkpoint.is_run_config(config_path):  # paths relative to that run
            run_cfg = checkpoint.read_config(pathlib.Path(config_path).parent, overrides=args.set)
        else:
            run_cfg = load_config(config_path, overrides=args.set)
        setup = prepare_data(run_cfg, train=False)
        cfg = setup.cfg
        if cfg.data.objective == "grpo":
            raise ConfigError("eval of data.objective=grpo is the reward of greedy completions, which training "
                              "logs as eval_reward_mean (train.eval_every) in WORKDIR/metrics.jsonl: read it there")
        check_backend(cfg)
        _, loaded = checkpoint.load_params(workdir, step=args.step)
        ref_params = None
        if cfg.data.objective == "dpo":  # the reference the run trained against, kept in its checkpoints
            ref_params = checkpoint.load_extra(workdir, args.step).get("ref_params")
            if ref_params is None:
                raise ConfigError(f"{workdir}: its checkpoint holds no DPO reference (ref_params), which eval "
                                  "of data.objective=dpo needs: evaluate a dpo run's own training checkpoint")
        abstract = jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))
        params, missing, _ = merge_params(abstract, loaded, str(workdir))
        if missing:
            raise ConfigError(
                f"{workdir}: checkpoint lacks {missing}; its model differs from {config_path}'s model section"
            )
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    mesh = parallel.make_mesh(cfg.parallel)
    with parallel.use_mesh(mesh, cfg.parallel):
        shardings = parallel.param_shardings(mesh, cfg)
        eval_step = jax.jit(make_eval_step(build_model(cfg.model), cfg))
        sums = evaluate(eval_step, jax.device_put(params, shardings), setup.eval_batches, mesh, ref_params)
    result = {
        "step": args.step if args.step is not None else checkpoint_step(workdir),
        **metrics_lib.summarize(sums, bytes_are_tokens=setup.bytes_are_tokens, prefix="eval_"),
        **metrics_lib.baselines(setup.eval_batches, cfg.data.objective),
    }
    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(metrics_lib.dumps(result, indent=2) + "\n")
    print(metrics_lib.dumps(result, indent=2))
    return 0


def checkpoint_step(workdir: pathlib.Path) -> int:
    """The latest complete checkpoint step of a run directory."""
    from flaxformer_lite.runtime import checkpoint

    with checkpoint.manager(workdir, read_only=True, best_metric=None) as mngr:
        return mngr.latest_step()
