"""Typed views of exo's cluster state, nodes and models, and the pure parsers that build them."""

from __future__ import annotations

from typing import Any, Literal, NewType, TypeVar

import msgspec

from kowalski.common.errors import ParseError

NodeId = NewType("NodeId", str)
InstanceId = NewType("InstanceId", str)
RunnerId = NewType("RunnerId", str)
ModelId = NewType("ModelId", str)

# v1: exo 1.x (master/worker, /state); v0: exo 0.0.x (/v1/topology);
# openai: any plain OpenAI-compatible server, such as llama.cpp's llama-server.
Flavour = Literal["v1", "v0", "openai"]
FLAVOURS: tuple[Flavour, ...] = ("v1", "v0", "openai")

# exo's runner statuses, its `Runner` tag prefix removed. Unknown tags are kept verbatim.
RunnerStatus = Literal[
    "Idle", "Connecting", "Connected", "Loading", "Loaded", "WarmingUp", "Ready", "Running",
    "ShuttingDown", "Shutdown", "Failed",
]
# A Running runner is Ready and busy with a request: both have their share of the model loaded.
SERVING_STATUSES = frozenset({"Ready", "Running"})

MIB = 1024 * 1024

T = TypeVar("T")


class _View(msgspec.Struct, frozen=True, kw_only=True):
    pass


class RunnerInfo(_View, frozen=True):
    runner_id: RunnerId
    status: str
    error_message: str | None = None
    layers_loaded: int | None = None
    total_layers: int | None = None

    @property
    def serving(self) -> bool:
        return self.status in SERVING_STATUSES


class InstanceInfo(_View, frozen=True):
    instance_id: InstanceId
    # exo's instance tag: MlxRingInstance, MlxJacclInstance, LlamaCppInstance.
    kind: str
    model_id: ModelId
    runner_ids: tuple[RunnerId, ...]
    node_ids: tuple[NodeId, ...]
    context_length: int | None = None


class NodeInfo(_View, frozen=True):
    node_id: NodeId
    name: str = ""
    chip: str = ""
    model: str = ""
    # None where the server does not say (exo v0 gives no free memory figure).
    memory_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    # exo v0 only: its table figure for the chip. exo v1 reports no FLOPS at all.
    flops_fp16_tflops: float | None = None
    # ISO 8601 time the master last heard from the node (exo v1).
    last_seen: str | None = None


class ModelInfo(_View, frozen=True):
    model_id: ModelId
    ready: bool
    name: str = ""
    context_length: int | None = None
    # exo v1: the instances serving the model, all of whose runners are Ready or Running.
    instance_ids: tuple[InstanceId, ...] = ()


class TaskInfo(_View, frozen=True):
    task_id: str
    # exo's task tag: CreateRunner, LoadModel, StartWarmup, Shutdown, TextGeneration...
    kind: str
    status: str
    instance_id: str | None = None


class Health(_View, frozen=True):
    """One probe of an endpoint; true when it answered."""

    ok: bool
    latency_ms: float
    flavour: Flavour | None = None
    error: str = ""

    def __bool__(self) -> bool:
        return self.ok


class PlacementResult(_View, frozen=True):
    command_id: str
    message: str
    model_id: ModelId
    # The placed instance (POST /instance); None from the older /place_instance, whose
    # instance only shows up in /state.
    instance_id: InstanceId | None = None


class ClusterState(_View, frozen=True):
    """The parts of exo v1's /state that Kowalski uses."""

    nodes: tuple[NodeInfo, ...]
    instances: dict[InstanceId, InstanceInfo]
    runners: dict[RunnerId, RunnerInfo]
    tasks: tuple[TaskInfo, ...] = ()
    last_event_index: int = -1

    def instance_ready(self, instance: InstanceInfo) -> bool:
        """exo serves through an instance only once every one of its runners is Ready."""
        statuses = [self.runners.get(runner_id) for runner_id in instance.runner_ids]
        return bool(statuses) and all(r is not None and r.serving for r in statuses)

    def ready_models(self) -> list[ModelInfo]:
        """Models with at least one instance whose runners are all Ready or Running."""
        ready: dict[ModelId, list[InstanceInfo]] = {}
        for instance in self.instances.values():
            if self.instance_ready(instance):
                ready.setdefault(instance.model_id, []).append(instance)
        return [
            ModelInfo(
                model_id=model_id, ready=True, name=model_id.rsplit("/", 1)[-1],
                context_length=instances[0].context_length,
                instance_ids=tuple(i.instance_id for i in instances),
            )
            for model_id, instances in ready.items()
        ]

    def describe_model(self, model_id: str) -> str:
        """Where a model's instances stand, for error messages."""
        parts = []
        for instance in self.instances.values():
            if instance.model_id != model_id:
                continue
            runners = []
            for runner_id in instance.runner_ids:
                runner = self.runners.get(runner_id)
                status = runner.status if runner is not None else "missing"
                if runner is not None and runner.error_message:
                    status += f" ({runner.error_message})"
                runners.append(status)
            parts.append(f"instance {instance.instance_id}: runners {', '.join(runners)}")
        return "; ".join(parts) or "no instance"


# --- exo v1 wire format: camelCase keys, tagged unions written {"TypeName": {...}} ---------


class _Wire(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    pass


class _Bytes(msgspec.Struct, frozen=True, kw_only=True):
    # /state writes {"inBytes": n}; other answers (await, generation stats) {"in_bytes": n}.
    camel: int | None = msgspec.field(default=None, name="inBytes")
    snake: int | None = msgspec.field(default=None, name="in_bytes")

    @property
    def value(self) -> int | None:
        return self.camel if self.camel is not None else self.snake


class _Memory(_Wire, frozen=True):
    ram_total: _Bytes | None = None
    ram_available: _Bytes | None = None


class _Identity(_Wire, frozen=True):
    model_id: str = ""
    chip_id: str = ""
    friendly_name: str = ""


class _RunnerFields(_Wire, frozen=True):
    error_message: str | None = None
    layers_loaded: int | None = None
    total_layers: int | None = None


class _ModelCard(_Wire, frozen=True):
    model_id: str = ""
    context_length: int | None = None


class _Shard(_Wire, frozen=True):
    model_card: _ModelCard | None = None
    device_rank: int = 0


class _ShardAssignments(_Wire, frozen=True):
    model_id: str
    runner_to_shard: dict[str, dict[str, _Shard]] = msgspec.field(default_factory=dict)
    node_to_runner: dict[str, str] = msgspec.field(default_factory=dict)


class _Instance(_Wire, frozen=True):
    instance_id: str
    shard_assignments: _ShardAssignments


class _Task(_Wire, frozen=True):
    task_id: str = ""
    task_status: str = ""
    instance_id: str | None = None


class _Topology(_Wire, frozen=True):
    nodes: list[Any] = msgspec.field(default_factory=list)


class _State(_Wire, frozen=True):
    instances: dict[str, dict[str, _Instance]] = msgspec.field(default_factory=dict)
    runners: dict[str, dict[str, _RunnerFields]] = msgspec.field(default_factory=dict)
    # Kept raw: decoded only when it is the usual map (trimmed samples put a note here).
    tasks: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    last_seen: dict[str, str] = msgspec.field(default_factory=dict)
    topology: _Topology | None = None
    last_event_applied_idx: int = -1
    node_identities: dict[str, _Identity] = msgspec.field(default_factory=dict)
    node_memory: dict[str, _Memory] = msgspec.field(default_factory=dict)


def parse_instance(data: bytes | str, source: str = "/instance") -> InstanceId:
    """The id of a tagged instance, as /instance/placement and /instance/{id} answer."""
    tagged = decode(data, dict[str, _Instance], source)
    return InstanceId(_untag(tagged, source)[1].instance_id)


def decode(data: bytes | str, kind: type[T], source: str) -> T:
    """Decode JSON into a struct; a ParseError names the source and the bad field."""
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.DecodeError as exc:
        raise ParseError(f"{source}: unexpected answer: {exc}") from None


def _untag(tagged: dict[str, T], where: str) -> tuple[str, T]:
    if len(tagged) != 1:
        raise ParseError(f"{where}: expected one tag, got {sorted(tagged)}")
    return next(iter(tagged.items()))


def parse_state(data: bytes | str, source: str = "/state") -> ClusterState:
    """exo v1's GET /state."""
    wire = decode(data, _State, source)
    instances: dict[InstanceId, InstanceInfo] = {}
    for key, tagged in wire.instances.items():
        kind, inst = _untag(tagged, f"{source}: instances.{key}")
        assignments = inst.shard_assignments
        shards = [_untag(s, f"{source}: shard")[1] for s in assignments.runner_to_shard.values()]
        cards = [s.model_card for s in shards if s.model_card is not None]
        instances[InstanceId(key)] = InstanceInfo(
            instance_id=InstanceId(inst.instance_id), kind=kind,
            model_id=ModelId(assignments.model_id),
            runner_ids=tuple(RunnerId(r) for r in assignments.runner_to_shard),
            node_ids=tuple(NodeId(n) for n in assignments.node_to_runner),
            context_length=cards[0].context_length if cards else None,
        )
    runners: dict[RunnerId, RunnerInfo] = {}
    for key, tagged_status in wire.runners.items():
        tag, fields = _untag(tagged_status, f"{source}: runners.{key}")
        runners[RunnerId(key)] = RunnerInfo(
            runner_id=RunnerId(key), status=tag.removeprefix("Runner"),
            error_message=fields.error_message, layers_loaded=fields.layers_loaded,
            total_layers=fields.total_layers,
        )
    return ClusterState(
        nodes=_nodes(wire), instances=instances, runners=runners, tasks=_tasks(wire.tasks),
        last_event_index=wire.last_event_applied_idx,
    )


def _nodes(wire: _State) -> tuple[NodeInfo, ...]:
    topology = wire.topology.nodes if wire.topology is not None else []
    ids = dict.fromkeys(
        [n for n in topology if isinstance(n, str)]
        + [*wire.last_seen, *wire.node_identities, *wire.node_memory]
    )
    nodes = []
    for node_id in ids:
        identity = wire.node_identities.get(node_id, _Identity())
        memory = wire.node_memory.get(node_id, _Memory())
        nodes.append(NodeInfo(
            node_id=NodeId(node_id), name=identity.friendly_name, chip=identity.chip_id,
            model=identity.model_id,
            memory_total_bytes=memory.ram_total.value if memory.ram_total else None,
            memory_available_bytes=memory.ram_available.value if memory.ram_available else None,
            last_seen=wire.last_seen.get(node_id),
        ))
    return tuple(nodes)


def _tasks(raw: msgspec.Raw) -> tuple[TaskInfo, ...]:
    try:
        tagged_tasks = msgspec.json.decode(raw, type=dict[str, dict[str, _Task]]) if raw else {}
    except msgspec.DecodeError:
        return ()
    tasks = []
    for key, tagged in tagged_tasks.items():
        if len(tagged) == 1:
            kind, task = next(iter(tagged.items()))
            tasks.append(TaskInfo(
                task_id=task.task_id or key, kind=kind, status=task.task_status,
                instance_id=task.instance_id,
            ))
    return tuple(tasks)


# --- exo v0 and OpenAI-compatible servers ------------------------------------------------


class _V0Flops(msgspec.Struct, frozen=True):
    fp32: float = 0.0
    fp16: float = 0.0
    int8: float = 0.0


class _V0Node(msgspec.Struct, frozen=True):
    model: str = ""
    chip: str = ""
    # MiB
    memory: int = 0
    flops: _V0Flops | None = None


class _V0Topology(msgspec.Struct, frozen=True):
    nodes: dict[str, _V0Node] = msgspec.field(default_factory=dict)


def parse_v0_topology(data: bytes | str, source: str = "/v1/topology") -> list[NodeInfo]:
    """exo v0's GET /v1/topology (`{}` before the node has a topology)."""
    wire = decode(data, _V0Topology, source)
    return [
        NodeInfo(
            node_id=NodeId(node_id), name=node.model, chip=node.chip, model=node.model,
            memory_total_bytes=node.memory * MIB if node.memory else None,
            # exo v0 writes 0 for chips missing from its table.
            flops_fp16_tflops=(node.flops.fp16 or None) if node.flops is not None else None,
        )
        for node_id, node in wire.nodes.items()
    ]


class _LlamaMeta(msgspec.Struct, frozen=True):
    n_ctx: int | None = None


class _ModelEntry(msgspec.Struct, frozen=True):
    id: str
    name: str = ""
    # exo v1 writes 0 when it does not know.
    context_length: int | None = None
    # exo v0 only.
    ready: bool | None = None
    # llama-server only.
    meta: _LlamaMeta | None = None


class _ModelList(msgspec.Struct, frozen=True):
    data: list[_ModelEntry]


def parse_model_list(
    data: bytes | str, source: str = "/v1/models", *, ready: frozenset[str] | None = None,
) -> list[ModelInfo]:
    """An OpenAI-style model list; `ready` overrides readiness (exo v1 decides it from /state)."""
    wire = decode(data, _ModelList, source)
    models = []
    for entry in wire.data:
        context = entry.context_length or (entry.meta.n_ctx if entry.meta else None) or None
        if ready is not None:
            is_ready = entry.id in ready
        else:
            is_ready = entry.ready if entry.ready is not None else True
        models.append(ModelInfo(
            model_id=ModelId(entry.id), ready=is_ready,
            name=entry.name or entry.id.rsplit("/", 1)[-1], context_length=context,
        ))
    return models
