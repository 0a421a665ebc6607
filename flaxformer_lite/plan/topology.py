"""TPU slices by their Cloud TPU names, and compile-only devices for them from libtpu.

    topo = parse("v5p-64")            # 32 chips of v5p, 4x4x2 ... laid out as libtpu wants
    devices = compile_devices(topo)   # jax devices to build a mesh on; no chip needed

Cloud TPU names a v4 or v5p slice by its TensorCores (two per chip, one JAX device per
chip in megacore mode: v5p-8 is 4 chips) and a v5e (v5litepod) or v6e slice by its chips
(v5e-8 is 8 chips). libtpu's own names (`v5e:2x2`, `v5p:2x2x1`) are accepted as well.
The chips' figures are the published Cloud TPU specifications (cloud.google.com/tpu/docs,
"System architecture" of each version): HBM per chip, bf16 peak and HBM bandwidth.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from flaxformer_lite.errors import UserError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: how Cloud TPU counts it, its libtpu name and its published figures."""

    libtpu: str  # libtpu's prefix: "v5e" in "v5e:2x2"
    dims: int  # 2 (v5e, v6e) or 3 (v4, v5p) torus dimensions
    cores_per_name_unit: int  # 2 where the Cloud TPU name counts TensorCores (v4, v5p)
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float


CHIPS = {
    "v4": Chip("v4", 3, 2, 32 * GIB, 275e12, 1228e9),
    "v5e": Chip("v5e", 2, 1, 16 * GIB, 197e12, 819e9),
    "v5p": Chip("v5p", 3, 2, 95 * GIB, 459e12, 2765e9),
    "v6e": Chip("v6e", 2, 1, 32 * GIB, 918e12, 1640e9),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
NAMES_HINT = "a Cloud TPU name such as v4-8, v5e-8 (v5litepod-8), v5p-64, v6e-16, or libtpu's v5e:2x2"


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: its name as given, the chip, and the chips' layout (one JAX device each)."""

    name: str
    version: str  # key of CHIPS
    shape: tuple[int, ...]

    @property
    def chip(self) -> Chip:
        return CHIPS[self.version]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.libtpu}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """The TPU_ACCELERATOR_TYPE a VM of this slice reports (v5e is `v5litepod`)."""
        prefix = "v5litepod" if self.version == "v5e" else self.version
        return f"{prefix}-{self.chips * self.chip.cores_per_name_unit}"


def chip_layout(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU gives `chips` chips: from 2x2(x1), each doubling goes to the
    last of the shortest sides (v5p-16 2x2x2, v5p-32 2x2x4, v5p-64 2x4x4, v5e-8 2x4)."""
    if chips < 1 or chips & (chips - 1):
        raise UserError(f"--topology: {chips} chips is not a power of two; name {NAMES_HINT}")
    shape = [1] * dims
    while math.prod(shape) < chips:
        if dims == 3 and math.prod(shape) < 4:  # a 2x2 host board first, then the third side
            grow = 0 if shape[0] == 1 else 1
        else:
            short = min(shape)
            grow = max(i for i, s in enumerate(shape) if s == short)
        shape[grow] *= 2
    return tuple(shape)


def parse(name: str) -> Topology:
    """A Topology from a Cloud TPU name (v5p-8) or libtpu's (v5p:2x2x1); UserError if unknown."""
    text = name.strip().lower()
    named = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    shaped = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", text)
    if not (named or shaped):
        raise UserError(f"--topology {name!r} is not a TPU slice name; use {NAMES_HINT}")
    version = (named or shaped).group(1)
    version = ALIASES.get(version, "v5p" if version == "v5" else version)
    if version not in CHIPS:
        raise UserError(f"--topology {name!r}: unknown TPU version {version!r}; known: {', '.join(CHIPS)} "
                        "(v5litepod = v5e)")
    chip = CHIPS[version]
    if shaped:
        shape = tuple(int(s) for s in shaped.group(2).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise UserError(f"--topology {name!r}: a {version} slice has {chip.dims} dimensions, e.g. "
                            f"{chip.libtpu}:{'x'.join(['2'] * chip.dims)}")
        return Topology(name, version, shape)
    units = int(named.group(2))
    if units % chip.cores_per_name_unit:
        raise UserError(f"--topology {name!r}: {version} slices are named by TensorCores, two a chip "
                        f"({version}-8 is 4 chips); use an even number")
    chips = units // chip.cores_per_name_unit
    shape = chip_layout(chips, chip.dims)
    return Topology(name, version, shape)


def libtpu_environment(topo: Topology) -> None:
    """Environment defaults for a compile-only libtpu in this process, set before JAX starts
    its backends: libtpu warns at start-up without TPU_ACCELERATOR_TYPE and
    TPU_WORKER_HOSTNAMES; its lock file would refuse a second process (a plan beside a
    test run) without ALLOW_MULTIPLE_LIBTPU_LOAD; and JAX's default backend stays the CPU,
    so a plan never takes a local chip another run is using (the topology's devices
    compile without it)."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def require_libtpu() -> None:
    """UserError naming the fix when libtpu, the TPU compiler, is not installed."""
    if importlib.util.find_spec("libtpu") is None:
        import jax

        raise UserError("plan compiles for TPUs with libtpu, which is not installed: pip install "
                        f"'flaxformer_lite[tpu]' (or \"jax[tpu]=={jax.__version__}\"); it needs no TPU chip")


def compile_devices(topo: Topology) -> list:
    """The slice's devices for compiling only (one per chip), from libtpu's topology.

    Turns off JAX's persistent compilation cache in this process: an executable compiled
    without a chip cannot be read back from it (JAX warns and compiles again)."""
    require_libtpu()
    import jax
    from jax.experimental import topologies

    jax.config.update("jax_enable_compilation_cache", False)

    extra = {"chip_config_name": "megacore"} if topo.chip.cores_per_name_unit == 2 else {}
    try:
        devices = topologies.get_topology_desc(topo.libtpu_name, platform="tpu", **extra).devices
    except Exception as e:  # libtpu's JaxRuntimeError: an unsupported shape, for one
        raise UserError(f"--topology {topo.name}: libtpu cannot describe {topo.libtpu_name}: "
                        f"{str(e).splitlines()[0]}") from None
    if len(devices) != topo.chips:
        raise UserError(f"--topology {topo.name}: libtpu gave {len(devices)} devices for {topo.chips} chips")
    return list(devices)
