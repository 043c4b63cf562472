# The parallel layout of a run (degrees and this rank's coordinates), computed before any model exists.
"""``ParallelDims`` is a pure function of the parallel config and the world (rank, size): no
process group, no model. The trainer builds it first, so the data loader knows its
data-parallel rank and size before the model is built (a bad shard pattern still fails
before any weights are allocated), and the engine is built from the same object, so the data
streams, the noise seeds and the loss-count reductions all use one layout.

Ranks are laid out pp-major and tp-minor, ``rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i``
(the device-mesh order ``("pp", "dp", "cp", "tp")``): a tensor-parallel group is neighbouring
ranks, the GPUs of one NVLink island, and a context-parallel group (``cp``: Ulysses sequence
parallelism, mmgen/parallel/context.py) the next ones; the ``cp`` ranks of one data-parallel
rank read the same rows and each keeps its slice of the positions. Expert parallelism splits the data-parallel ranks of the experts
(``ep`` divides ``dp``), so it is not a factor of the world size. The
``ep`` neighbouring data-parallel ranks form an expert-parallel group (they hold different
experts and exchange tokens), and the ranks ``ep`` apart, holding the same experts, an
expert-data-parallel group (``dp / ep`` ranks) over which expert gradients are summed
(``parallel.ep``, ddp, fsdp2, zero1/2: mmgen/parallel/ep.py; not combined with ``cp`` yet). tp and
pp are megatron's (``parallel.tp``, ``parallel.pp``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

MESH_ORDER = ("pp", "dp", "cp", "tp")


@dataclass
class ParallelDims:
    """Degrees of the layout and this rank's place in it.

    Args:
        world_size: number of ranks.
        rank: this process's global rank.
        dp: data-parallel degree (ranks that read different data).
        tp, pp: tensor- and pipeline-parallel degrees (``dp * cp * tp * pp == world_size``).
        ep: expert-parallel degree (divides ``dp``).
        cp: context-parallel degree (ranks that share rows and split their positions).
    """

    world_size: int
    rank: int
    dp: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    _meshes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if min(self.dp, self.tp, self.pp, self.ep, self.cp) < 1:
            raise ValueError(f"parallel degrees must be >= 1: {self.degrees()}")
        if self.dp * self.cp * self.tp * self.pp != self.world_size:
            raise ValueError(f"parallel degrees dp={self.dp} x cp={self.cp} x tp={self.tp} x pp={self.pp} must "
                             f"multiply to the world size {self.world_size}")
        if (self.dp * self.tp) % self.ep:
            # megatron cuts its EP groups from the TP x DP ranks (experts are not TP-split); with
            # tp=1 (every other backend) this is "ep divides dp"
            raise ValueError(f"parallel: ep={self.ep} must divide dp={self.dp} x tp={self.tp}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @classmethod
    def from_config(cls, cfg, world_size: int, rank: int) -> "ParallelDims":
        """The layout ``cfg`` (a ParallelConfig) asks for on ``world_size`` ranks: data
        parallelism over what tensor and pipeline parallelism (megatron) leave.

        Raises:
            ConfigError: ``tp * pp`` does not divide the world size (one line; exit 2).
        """
        from mmgen.errors import ConfigError

        tp, pp, cp, ep = (getattr(cfg, k, 1) for k in ("tp", "pp", "cp", "ep"))
        if world_size % (tp * pp):
            raise ConfigError(f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp} does not divide the world size "
                              f"{world_size}: the degrees must multiply to it (dp = world / (tp * pp))")
        if world_size % (tp * pp * cp):
            raise ConfigError(f"parallel.cp={cp} x tp={tp} x pp={pp} = {tp * pp * cp} does not divide the world "
                              f"size {world_size}: the degrees must multiply to it (dp = world / (cp * tp * pp))")
        dp = world_size // (tp * pp * cp)
        if (dp * tp) % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide the {dp * tp} ranks of a pipeline stage "
                              f"(dp={dp} x tp={tp}) that the expert-parallel groups are cut from")
        return cls(world_size=world_size, rank=rank, dp=dp, tp=tp, pp=pp, cp=cp, ep=ep)

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (its data stream)."""
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def cp_rank(self) -> int:
        """This rank's index in its context-parallel group (which slice of the positions)."""
        return (self.rank // self.tp) % self.cp

    def degrees(self) -> dict[str, int]:
        # cp only when used, so the layouts of runs without it (meta.json) read as before
        out = {"dp": self.dp, "tp": self.tp, "pp": self.pp, "ep": self.ep}
        return {**out, "cp": self.cp} if self.cp > 1 else out

    def mesh(self, device_type: str):
        """The device mesh of this layout (dimensions of size 1 left out, except ``dp``).

        A collective on first use (every rank creates the sub-groups); needs the default
        process group, also for one process (``dist.ensure_process_group``)."""
        if device_type not in self._meshes:
            from torch.distributed.device_mesh import init_device_mesh

            sizes = {"pp": self.pp, "dp": self.dp, "cp": self.cp, "tp": self.tp}
            names = tuple(n for n in MESH_ORDER if sizes[n] > 1 or n == "dp")
            self._meshes[device_type] = init_device_mesh(device_type, tuple(sizes[n] for n in names),
                                                         mesh_dim_names=names)
        return self._meshes[device_type]

    def dp_mesh(self, device_type: str):
        """The 1-D mesh over this rank's data-parallel peers (FSDP shards over it)."""
        mesh = self.mesh(device_type)
        return mesh if mesh.ndim == 1 else mesh["dp"]

    def expert_mesh(self, device_type: str):
        """The 2-D mesh ``("edp", "ep")`` over the data-parallel ranks (``ep`` neighbours per
        expert-parallel group); tp = pp = 1 layouts only (the backends with ``parallel.ep``)."""
        key = ("experts", device_type)
        if key not in self._meshes:
            if self.dp != self.world_size:
                raise ValueError(f"parallel.ep needs a data-parallel-only layout: {self.degrees()}")
            from torch.distributed.device_mesh import init_device_mesh

            self._meshes[key] = init_device_mesh(device_type, (self.dp // self.ep, self.ep),
                                                 mesh_dim_names=("edp", "ep"))
        return self._meshes[key]

    def ep_group(self, device_type: str):
        """Ranks that hold different experts and exchange tokens (``ep`` of them)."""
        return self.expert_mesh(device_type)["ep"].get_group()

    def expert_dp_group(self, device_type: str):
        """Ranks that hold the same experts (``dp / ep``); None when there is one of each."""
        if self.dp == self.ep:
            return None
        return self.expert_mesh(device_type)["edp"].get_group()

    def dp_group(self, device_type: str):
        """The process group of this rank's data-parallel peers; None (the default group)
        when every rank is a data-parallel peer."""
        if self.dp == self.world_size:
            return None
        return self.dp_mesh(device_type).get_group()

    def cp_group(self, device_type: str):
        """The process group of this rank's context-parallel peers (``cp > 1`` only)."""
        return self.mesh(device_type)["cp"].get_group()

    def dp_cp_mesh(self, device_type: str):
        """The 1-D mesh over the ranks that hold a replica (or shard) of the same weights and
        sum their gradients: data-parallel x context-parallel peers (the data-parallel mesh
        without context parallelism)."""
        if self.cp == 1:
            return self.dp_mesh(device_type)
        key = (device_type, "dp_cp")
        if key not in self._meshes:
            self._meshes[key] = self.mesh(device_type)["dp", "cp"]._flatten("dp_cp")
        return self._meshes[key]

    def dp_cp_group(self, device_type: str):
        """Process group of :meth:`dp_cp_mesh`; None (the default group) when it is every rank."""
        if self.dp * self.cp == self.world_size:
            return None
        return self.dp_cp_mesh(device_type).get_group()
