"""Meshes, logical-axis rules and shardings: the only module that knows about devices.

Models name axes logically (`batch`, `embed`, `heads`, `mlp`, ...); the rules in
ParallelConfig map them to mesh axes `data`, `fsdp`, `tensor`. The same config runs on
one CPU, N simulated CPU devices, a GPU host or many hosts:

    mesh = make_mesh(cfg.parallel)
    with use_mesh(mesh, cfg.parallel):
        params = jax.jit(init, out_shardings=param_shardings(mesh, cfg))(key)
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxformer_lite.config import Config, ConfigError, ParallelConfig
from flaxformer_lite.models import param_logical_axes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes


def mesh_shape(pcfg: ParallelConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes; one -1 takes the devices left over."""
    sizes = [pcfg.data, pcfg.fsdp, pcfg.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("parallel: at most one of data/fsdp/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"parallel: sizes must be positive or -1, got data/fsdp/tensor={sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"parallel: {num_devices} devices are not divisible by the fixed axes (product {known})"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"parallel: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices; "
            "set one axis to -1 to take the rest"
        )
    return tuple(sizes)


def make_mesh(pcfg: ParallelConfig, devices: Optional[list] = None) -> Mesh:
    """A Mesh over all (or the given) devices with axes data, fsdp, tensor (Auto types)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(pcfg, len(devices))
    # Auto axes: Linen's logical with_sharding_constraint works with them (DESIGN.md).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def rules(pcfg: ParallelConfig) -> tuple:
    """The config's rules as flax wants them: (logical, None | mesh axis | mesh axes)."""
    out = []
    for rule in pcfg.rules:
        if not rule:
            raise ConfigError("parallel.rules: an empty rule; write [logical_axis, mesh_axis...]")
        name, *axes = rule
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ConfigError(f"parallel.rules: {name} maps to unknown mesh axes {unknown}; use {MESH_AXES}")
        out.append((name, None if not axes else axes[0] if len(axes) == 1 else tuple(axes)))
    return tuple(out)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, pcfg: ParallelConfig):
    """Make `mesh` current and the config's rules active, for jit and logical constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules(pcfg)):
        yield


def logical_to_sharding(mesh: Mesh, pcfg: ParallelConfig, logical_specs: Any) -> Any:
    """Map a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules(pcfg))


def param_shardings(mesh: Mesh, cfg: Config) -> dict:
    """{'params': NamedSharding tree} matching init_params(cfg.model, key)."""
    return logical_to_sharding(mesh, cfg.parallel, param_logical_axes(cfg.model))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated on `mesh` (scalars, step counters, RNG keys)."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(mesh: Mesh, batch: dict) -> dict:
    """Place a host-local batch of numpy arrays as global arrays split along the batch.

    Each process passes its own slice (its `process_index` shard of the data), so the
    global batch is process_count times the local one.
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
    }


def initialize_distributed() -> None:
    """Start jax.distributed for multi-process runs; a no-op for one process.

    Reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or lets JAX
    detect a cluster such as SLURM or a TPU pod when FFL_DISTRIBUTED=auto).
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        try:
            num = int(os.environ["JAX_NUM_PROCESSES"])
            pid = int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise ConfigError(
                "JAX_COORDINATOR_ADDRESS is set: also set JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                "to integers"
            ) from None
        jax.distributed.initialize(address, num_processes=num, process_id=pid)
    elif os.environ.get("FFL_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
