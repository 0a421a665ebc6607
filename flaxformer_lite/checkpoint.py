"""Run directories: the resolved config beside orbax checkpoints.

Layout of WORKDIR:
  config.yaml          the resolved Config (loadable by load_config)
  checkpoints/<step>/  orbax items: `params` (always), `extra` (optimizer state, RNG...;
                       training checkpoints only), `meta` (JSON: data-iterator state...)
  metrics.jsonl, ...   written by the trainer

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save leaves nothing that `latest_step` will pick up.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from flaxformer_lite.config import Config, ConfigError, dump_config, load_config

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


def write_config(workdir: str | pathlib.Path, cfg: Config) -> pathlib.Path:
    """Write WORKDIR/config.yaml (atomically: temp file + rename); return its path."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    tmp = path.with_suffix(".yaml.tmp")
    dump_config(cfg, tmp)
    tmp.replace(path)
    return path


def read_config(workdir: str | pathlib.Path) -> Config:
    """The resolved Config of a run directory."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(
            f"{path} not found: {workdir} is not a run directory (train into it, or "
            "`flaxformer-lite convert --from-hf DIR --to WORKDIR`)"
        )
    return load_config(path)


def manager(
    workdir: str | pathlib.Path,
    keep: int = 3,
    best_metric: Optional[str] = "eval_loss",
    *,
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """CheckpointManager on WORKDIR/checkpoints keeping the last `keep` steps plus the best.

    "Best" is the lowest `best_metric` among checkpoints saved with metrics.
    """
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_metric:
        policies.append(checkpoint_managers.BestN(
            get_metric_fn=lambda m: m[best_metric],
            reverse=True,  # BestN keeps the tail of the sorted list: descending = lowest last
            n=1,
            keep_checkpoints_without_metrics=False,
        ))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
    )
    directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    return ocp.CheckpointManager(directory, options=options, item_names=("params", "extra", "meta"))


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    *,
    params: Any,
    extra: Any = None,
    meta: Optional[dict] = None,
    metrics: Optional[dict] = None,
    force: bool = True,
) -> bool:
    """Save one step (params, optional extra pytree and JSON meta); True if saved."""
    items = {"params": ocp.args.StandardSave(params)}
    if extra is not None:
        items["extra"] = ocp.args.StandardSave(extra)
    if meta is not None:
        items["meta"] = ocp.args.JsonSave(meta)
    return mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def restore(
    mngr: ocp.CheckpointManager,
    step: Optional[int] = None,
    *,
    params_target: Any = None,
    extra_target: Any = None,
) -> tuple[Any, Any, Optional[dict]]:
    """(params, extra, meta) of `step` (default: the latest complete one).

    Targets are trees of arrays or jax.ShapeDtypeStruct (with shardings, for a sharded
    restore); None restores as saved. `extra` is None for a params-only checkpoint.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {mngr.directory}")
    items = {"params": ocp.args.StandardRestore(params_target)}
    if _present(mngr, step, "extra"):
        items["extra"] = ocp.args.StandardRestore(extra_target)
    if _present(mngr, step, "meta"):
        items["meta"] = ocp.args.JsonRestore()
    out = mngr.restore(step, args=ocp.args.Composite(**items))
    return out["params"], out.get("extra"), out.get("meta")


def _present(mngr: ocp.CheckpointManager, step: int, item: str) -> bool:
    return (pathlib.Path(str(mngr.directory)) / str(step) / item).exists()


def save_params(workdir: str | pathlib.Path, cfg: Config, params: Any, step: int = 0) -> None:
    """Write the config and a params-only checkpoint (e.g. converted weights)."""
    write_config(workdir, cfg)
    with manager(workdir, keep=1, best_metric=None, async_save=False) as mngr:
        save(mngr, step, params=params)
        mngr.wait_until_finished()


def load_params(workdir: str | pathlib.Path, step: Optional[int] = None) -> tuple[Config, Any]:
    """(Config, params) of a run directory: params of `step`, default the latest."""
    cfg = read_config(workdir)
    directory = pathlib.Path(workdir) / CHECKPOINT_DIR
    if not directory.exists():
        raise FileNotFoundError(f"{directory} not found: no checkpoints in {workdir}")
    with manager(workdir, read_only=True, best_metric=None) as mngr:
        if step is not None and step not in mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}: have {mngr.all_steps()}")
        params, _, _ = restore(mngr, step)
    return cfg, params
