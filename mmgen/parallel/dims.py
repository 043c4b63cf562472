# The parallel layout of a run (degrees and this rank's coordinates), computed before any model exists.
"""``ParallelDims`` is a pure function of the parallel config and the world (rank, size): no
process group, no model. The trainer builds it first, so the data loader knows its
data-parallel rank and size before the model is built (a bad shard pattern still fails
before any weights are allocated), and the engine is built from the same object, so the data
streams, the noise seeds and the loss-count reductions all use one layout.

Ranks are laid out pp-major and tp-minor, ``rank = (pp_i * dp + dp_i) * tp + tp_i`` (the
device-mesh order ``("pp", "dp", "tp")``): a tensor-parallel group is neighbouring ranks, the
GPUs of one NVLink island. Expert parallelism splits the data-parallel ranks of the experts
(``ep`` divides ``dp``), so it is not a factor of the world size. Today every backend is
data-parallel only (``tp = pp = ep = 1``, ``dp = world``); the megatron issue adds the
config fields that set the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MESH_ORDER = ("pp", "dp", "tp")


@dataclass
class ParallelDims:
    """Degrees of the layout and this rank's place in it.

    Args:
        world_size: number of ranks.
        rank: this process's global rank.
        dp: data-parallel degree (ranks that read different data).
        tp, pp: tensor- and pipeline-parallel degrees (``dp * tp * pp == world_size``).
        ep: expert-parallel degree (divides ``dp``).
    """

    world_size: int
    rank: int
    dp: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    _meshes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if min(self.dp, self.tp, self.pp, self.ep) < 1:
            raise ValueError(f"parallel degrees must be >= 1: {self.degrees()}")
        if self.dp * self.tp * self.pp != self.world_size:
            raise ValueError(f"parallel degrees dp={self.dp} x tp={self.tp} x pp={self.pp} must multiply to the "
                             f"world size {self.world_size}")
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

        tp, pp, ep = getattr(cfg, "tp", 1), getattr(cfg, "pp", 1), getattr(cfg, "ep", 1)
        if world_size % (tp * pp):
            raise ConfigError(f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp} does not divide the world size "
                              f"{world_size}: the degrees must multiply to it (dp = world / (tp * pp))")
        dp = world_size // (tp * pp)
        if (dp * tp) % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide the {dp * tp} ranks of a pipeline stage "
                              f"(dp={dp} x tp={tp}) that the expert-parallel groups are cut from")
        return cls(world_size=world_size, rank=rank, dp=dp, tp=tp, pp=pp, ep=ep)

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (its data stream)."""
        return (self.rank // self.tp) % self.dp

    def degrees(self) -> dict[str, int]:
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp, "ep": self.ep}

    def mesh(self, device_type: str):
        """The device mesh of this layout (dimensions of size 1 left out, except ``dp``).

        A collective on first use (every rank creates the sub-groups); needs the default
        process group, also for one process (``dist.ensure_process_group``)."""
        if device_type not in self._meshes:
            from torch.distributed.device_mesh import init_device_mesh

            sizes = {"pp": self.pp, "dp": self.dp, "tp": self.tp}
            names = tuple(n for n in MESH_ORDER if sizes[n] > 1 or n == "dp")
            self._meshes[device_type] = init_device_mesh(device_type, tuple(sizes[n] for n in names),
                                                         mesh_dim_names=names)
        return self._meshes[device_type]

    def dp_mesh(self, device_type: str):
        """The 1-D mesh over this rank's data-parallel peers (FSDP shards over it)."""
        mesh = self.mesh(device_type)
        return mesh if mesh.ndim == 1 else mesh["dp"]

    def dp_group(self, device_type: str):
        """The process group of this rank's data-parallel peers; None (the default group)
        when every rank is a data-parallel peer."""
        if self.dp == self.world_size:
            return None
        return self.dp_mesh(device_type).get_group()
