"""Per-rank memory of the model states (weights, gradients, optimizer) of a sharded run.

Why arithmetic, not measured: ``estimate`` runs one process on this machine,
but what each of N processes keeps follows from two things only: the
parameter counts (every parameter, and the trained ones: LoRA trains few)
and what the engine keeps per parameter, which its code fixes. The tables
below are read off that code (torch 2.13 DDP/FSDP2 through accelerate,
DeepSpeed 0.19 ZeRO) and checked against DeepSpeed's own estimators and a
measured FSDP run (tests/test_estimate_sharding.py).

Bytes per parameter before sharding (P: every parameter, T: trained ones):

* none / ddp: fp32 weights (4 P), gradients (4 T) and AdamW's two moments
  (8 T) on every rank, whatever ``train.precision``: accelerate's mixed
  precision is autocast, the stored tensors stay fp32. With more than one
  process DDP also keeps its reduction buckets, a second copy of the
  gradients (accelerate leaves ``gradient_as_bucket_view`` off).
* fsdp: the same tensors (accelerate keeps FSDP2's sharded parameters in fp32
  and casts to bf16 only when it gathers them), each split over the ranks;
  offload moves all three to the CPU (``CPUOffloadPolicy``).
* zero2 / zero3: in bf16/fp16 DeepSpeed casts the model to 16 bits (2 P),
  keeps a 16-bit partition of the reduced gradients (2 T), makes an fp32
  copy of it for the optimizer step (4 T) and an fp32 master copy plus the
  two moments (12 T); in fp32 the 16-bit parts are 4 bytes. ZeRO-2 shards
  gradients and optimizer; ZeRO-3 the weights too. Offload moves the
  optimizer and the gradient partitions to the CPU (ZeRO-2 then keeps no
  16-bit gradient partition: buckets are copied straight into the fp32 one),
  and under ZeRO-3 the weights' shards too.

Frozen parameters have weights only: sharded under zero3/fsdp like the rest,
replicated otherwise. Not counted here: the full weights ZeRO-3/FSDP gather
for one layer (FSDP: one wrapped block) at a time, communication buckets of
ZeRO and activations (measured separately, per process).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunesmith.errors import ConfigError

#: ``--shard`` choices; none and ddp are the same replicated data parallelism.
SHARD_KINDS = ("none", "ddp", "zero2", "zero3", "fsdp")
#: The kinds that shard something (and can offload).
SHARDED = ("zero2", "zero3", "fsdp")
#: Model states in report order.
STATES = ("weights", "gradients", "optimizer")
MIXED = ("bf16", "fp16")
MIB = 2**20


@dataclass(frozen=True)
class Sharding:
    """How the run is spread: kind (``SHARD_KINDS``), processes, offload to CPU."""

    kind: str = "none"
    processes: int = 1
    offload: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SHARD_KINDS:
            raise ConfigError(f"--shard {self.kind}: choose one of {', '.join(SHARD_KINDS)}")
        if self.processes < 1:
            raise ConfigError(f"--processes {self.processes}: needs at least 1 process")
        if self.offload and self.kind not in SHARDED:
            raise ConfigError(
                "--offload moves sharded states to the CPU: add --shard zero2, zero3 or fsdp"
            )

    @classmethod
    def from_options(cls, processes: int, shard: str | None, offload: bool) -> Sharding | None:
        """The CLI's options; ``None`` when they ask for nothing beyond one plain process."""
        if shard is None and processes == 1 and not offload:
            return None
        return cls(kind=shard or "ddp", processes=processes, offload=offload)


@dataclass(frozen=True)
class Part:
    """One family of tensors each rank keeps: ``per_param`` bytes for each parameter it covers."""

    state: str
    what: str
    per_param: int
    trained_only: bool
    sharded: bool
    offloaded: bool


@dataclass
class RankMemory:
    """Model states one rank keeps, in bytes, by part; the device and CPU sums by state."""

    sharding: Sharding
    precision: str
    parts: list[tuple[Part, int]]

    def on(self, cpu: bool) -> dict[str, int]:
        """Bytes per state on the CPU (``cpu``) or on the device."""
        sums = dict.fromkeys(STATES, 0)
        for part, size in self.parts:
            if part.offloaded == cpu:
                sums[part.state] += size
        return sums

    @property
    def device(self) -> dict[str, int]:
        """Bytes per state on the accelerator."""
        return self.on(cpu=False)

    @property
    def cpu(self) -> dict[str, int]:
        """Bytes per state offloaded to CPU memory."""
        return self.on(cpu=True)

    def as_dict(self) -> dict:
        """JSON-able: the settings, device and CPU bytes by state and in total, the parts."""
        device, cpu = self.device, self.cpu
        return {
            **asdict(self.sharding),
            "precision": self.precision,
            "device": device,
            "cpu": cpu,
            "device_total": sum(device.values()),
            "cpu_total": sum(cpu.values()),
            "parts": [{**asdict(part), "bytes": size} for part, size in self.parts],
        }


def layout(sharding: Sharding, precision: str) -> list[Part]:
    """What each rank keeps per parameter under ``sharding`` (see the module docstring)."""
    kind, offload = sharding.kind, sharding.offload
    if kind in ("none", "ddp", "fsdp"):
        shard = kind == "fsdp"
        parts = [
            Part("weights", "fp32, every parameter", 4, False, shard, offload),
            Part("gradients", "fp32, trained parameters", 4, True, shard, offload),
            Part("optimizer", "AdamW's two fp32 moments", 8, True, shard, offload),
        ]
        if not shard and sharding.processes > 1:
            parts.insert(2, Part("gradients", "DDP's reduction buckets", 4, True, False, False))
        return parts
    low, name = (2, precision) if precision in MIXED else (4, "fp32")
    zero3 = kind == "zero3"
    parts = [Part("weights", f"{name}, every parameter", low, False, zero3, offload and zero3)]
    if not (offload and kind == "zero2"):
        parts.append(Part("gradients", f"{name} reduced partition", low, True, True, offload))
    return [
        *parts,
        Part("gradients", "fp32 copy for the step", 4, True, True, offload),
        Part("optimizer", "fp32 master + AdamW's two moments", 12, True, True, offload),
    ]


def per_rank(total: int, trained: int, precision: str, sharding: Sharding) -> RankMemory:
    """Model-state bytes of the fullest rank (an uneven split rounds up).

    Args:
        total: Every parameter of the model (frozen ones included).
        trained: Parameters the optimizer updates.
        precision: fp32 | bf16 | fp16, as the estimate resolved it.
        sharding: Kind, processes and offload.
    """
    n = sharding.processes
    sized = []
    for part in layout(sharding, precision):
        count = trained if part.trained_only else total
        share = -(-count // n) if part.sharded else count
        sized.append((part, share * part.per_param))
    return RankMemory(sharding, precision, sized)


def format_per_rank(mem: RankMemory, activations: int | None = None) -> str:
    """The per-rank table ``tunesmith estimate --processes/--shard`` prints."""
    s = mem.sharding
    lines = [
        f"per rank ({s.kind}, {s.processes} process{'es' if s.processes > 1 else ''}, "
        f"{mem.precision}{', offload to CPU' if s.offload else ''}): model states",
        f"  {'':<10} {'device MiB':>11} {'CPU MiB':>9}",
    ]
    for part, size in mem.parts:
        spread = f"1/{s.processes} each" if part.sharded and s.processes > 1 else "full copy"
        device, cpu = (0, size) if part.offloaded else (size, 0)
        lines.append(
            f"  {part.state:<10} {device / MIB:>11,.1f} {cpu / MIB:>9,.1f}  ({part.what}; {spread})"
        )
    device_total, cpu_total = sum(mem.device.values()), sum(mem.cpu.values())
    lines.append(f"  {'total':<10} {device_total / MIB:>11,.1f} {cpu_total / MIB:>9,.1f}")
    if activations is not None:
        lines.append(
            f"  plus activations {activations / MIB:,.1f} MiB per process (measured above; "
            "train.batch_size is per process)"
        )
    if s.kind in ("zero3", "fsdp") and s.processes > 1:
        lines.append("  plus the full weights of the layer being computed (gathered one at a time)")
    return "\n".join(lines)
