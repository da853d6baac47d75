from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3FN: _ClassVar[DType]

class TransportKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_UNSPECIFIED: _ClassVar[TransportKind]
    TRANSPORT_SHM: _ClassVar[TransportKind]
    TRANSPORT_CUDA_IPC: _ClassVar[TransportKind]
    TRANSPORT_INLINE: _ClassVar[TransportKind]

class BoundaryMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BOUNDARY_MODE_UNSPECIFIED: _ClassVar[BoundaryMode]
    BOUNDARY_MODE_NEVER: _ClassVar[BoundaryMode]
    BOUNDARY_MODE_EVERY_STEP: _ClassVar[BoundaryMode]
    BOUNDARY_MODE_THRESHOLD: _ClassVar[BoundaryMode]

class TaskType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_TYPE_UNSPECIFIED: _ClassVar[TaskType]
    TASK_TYPE_LOCALIZATION: _ClassVar[TaskType]
    TASK_TYPE_AGGREGATION: _ClassVar[TaskType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_FLOAT8_E4M3FN: DType
TRANSPORT_UNSPECIFIED: TransportKind
TRANSPORT_SHM: TransportKind
TRANSPORT_CUDA_IPC: TransportKind
TRANSPORT_INLINE: TransportKind
BOUNDARY_MODE_UNSPECIFIED: BoundaryMode
BOUNDARY_MODE_NEVER: BoundaryMode
BOUNDARY_MODE_EVERY_STEP: BoundaryMode
BOUNDARY_MODE_THRESHOLD: BoundaryMode
TASK_TYPE_UNSPECIFIED: TaskType
TASK_TYPE_LOCALIZATION: TaskType
TASK_TYPE_AGGREGATION: TaskType

class ModelLayout(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "num_query_heads", "head_dim", "dtype", "max_tokens")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERY_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int
    dtype: DType
    max_tokens: int
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., num_query_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class FullConfig(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamingConfig(_message.Message):
    __slots__ = ("n_sink", "window")
    N_SINK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    n_sink: int
    window: int
    def __init__(self, n_sink: _Optional[int] = ..., window: _Optional[int] = ...) -> None: ...

class LouisKVConfig(_message.Message):
    __slots__ = ("budget", "n_sink", "window", "cluster_size", "kmeans_iters", "threshold", "max_segment", "pre_rope", "observation", "ingest_select", "pin_ingest", "target_rate", "chunk_select", "min_gap", "chunk_votes", "chunk_span", "exact_chunks", "ingest_span", "observation_vote")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    N_SINK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_SIZE_FIELD_NUMBER: _ClassVar[int]
    KMEANS_ITERS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    PRE_ROPE_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    INGEST_SELECT_FIELD_NUMBER: _ClassVar[int]
    PIN_INGEST_FIELD_NUMBER: _ClassVar[int]
    TARGET_RATE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SELECT_FIELD_NUMBER: _ClassVar[int]
    MIN_GAP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_VOTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SPAN_FIELD_NUMBER: _ClassVar[int]
    EXACT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    INGEST_SPAN_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_VOTE_FIELD_NUMBER: _ClassVar[int]
    budget: int
    n_sink: int
    window: int
    cluster_size: int
    kmeans_iters: int
    threshold: float
    max_segment: int
    pre_rope: bool
    observation: int
    ingest_select: str
    pin_ingest: float
    target_rate: float
    chunk_select: str
    min_gap: int
    chunk_votes: int
    chunk_span: int
    exact_chunks: bool
    ingest_span: int
    observation_vote: str
    def __init__(self, budget: _Optional[int] = ..., n_sink: _Optional[int] = ..., window: _Optional[int] = ..., cluster_size: _Optional[int] = ..., kmeans_iters: _Optional[int] = ..., threshold: _Optional[float] = ..., max_segment: _Optional[int] = ..., pre_rope: bool = ..., observation: _Optional[int] = ..., ingest_select: _Optional[str] = ..., pin_ingest: _Optional[float] = ..., target_rate: _Optional[float] = ..., chunk_select: _Optional[str] = ..., min_gap: _Optional[int] = ..., chunk_votes: _Optional[int] = ..., chunk_span: _Optional[int] = ..., exact_chunks: bool = ..., ingest_span: _Optional[int] = ..., observation_vote: _Optional[str] = ...) -> None: ...

class QuestConfig(_message.Message):
    __slots__ = ("budget", "n_sink", "window", "page_size", "exact_chunks")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    N_SINK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXACT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    budget: int
    n_sink: int
    window: int
    page_size: int
    exact_chunks: bool
    def __init__(self, budget: _Optional[int] = ..., n_sink: _Optional[int] = ..., window: _Optional[int] = ..., page_size: _Optional[int] = ..., exact_chunks: bool = ...) -> None: ...

class SnapKVConfig(_message.Message):
    __slots__ = ("budget", "n_sink", "window", "pool_kernel", "observation")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    N_SINK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    POOL_KERNEL_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    budget: int
    n_sink: int
    window: int
    pool_kernel: int
    observation: int
    def __init__(self, budget: _Optional[int] = ..., n_sink: _Optional[int] = ..., window: _Optional[int] = ..., pool_kernel: _Optional[int] = ..., observation: _Optional[int] = ...) -> None: ...

class WindowKVConfig(_message.Message):
    __slots__ = ("budget", "n_sink", "window", "window_size", "group_size", "decay", "task", "keep_pruned_in_host", "threshold", "budget_fraction", "group_select", "variant")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    N_SINK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DECAY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    KEEP_PRUNED_IN_HOST_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FRACTION_FIELD_NUMBER: _ClassVar[int]
    GROUP_SELECT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    budget: int
    n_sink: int
    window: int
    window_size: int
    group_size: int
    decay: bool
    task: TaskType
    keep_pruned_in_host: bool
    threshold: float
    budget_fraction: float
    group_select: str
    variant: str
    def __init__(self, budget: _Optional[int] = ..., n_sink: _Optional[int] = ..., window: _Optional[int] = ..., window_size: _Optional[int] = ..., group_size: _Optional[int] = ..., decay: bool = ..., task: _Optional[_Union[TaskType, str]] = ..., keep_pruned_in_host: bool = ..., threshold: _Optional[float] = ..., budget_fraction: _Optional[float] = ..., group_select: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class PolicyConfig(_message.Message):
    __slots__ = ("name", "full", "streaming", "louiskv", "quest", "snapkv", "windowkv")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    LOUISKV_FIELD_NUMBER: _ClassVar[int]
    QUEST_FIELD_NUMBER: _ClassVar[int]
    SNAPKV_FIELD_NUMBER: _ClassVar[int]
    WINDOWKV_FIELD_NUMBER: _ClassVar[int]
    name: str
    full: FullConfig
    streaming: StreamingConfig
    louiskv: LouisKVConfig
    quest: QuestConfig
    snapkv: SnapKVConfig
    windowkv: WindowKVConfig
    def __init__(self, name: _Optional[str] = ..., full: _Optional[_Union[FullConfig, _Mapping]] = ..., streaming: _Optional[_Union[StreamingConfig, _Mapping]] = ..., louiskv: _Optional[_Union[LouisKVConfig, _Mapping]] = ..., quest: _Optional[_Union[QuestConfig, _Mapping]] = ..., snapkv: _Optional[_Union[SnapKVConfig, _Mapping]] = ..., windowkv: _Optional[_Union[WindowKVConfig, _Mapping]] = ...) -> None: ...

class ShmRef(_message.Message):
    __slots__ = ("name", "offset", "fd_socket")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FD_SOCKET_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    fd_socket: str
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., fd_socket: _Optional[str] = ...) -> None: ...

class CudaIpcRef(_message.Message):
    __slots__ = ("handle", "offset", "device", "event_handle")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    offset: int
    device: int
    event_handle: bytes
    def __init__(self, handle: _Optional[bytes] = ..., offset: _Optional[int] = ..., device: _Optional[int] = ..., event_handle: _Optional[bytes] = ...) -> None: ...

class TensorRef(_message.Message):
    __slots__ = ("dtype", "shape", "shm", "cuda_ipc", "inline_data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    INLINE_DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    shm: ShmRef
    cuda_ipc: CudaIpcRef
    inline_data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., shm: _Optional[_Union[ShmRef, _Mapping]] = ..., cuda_ipc: _Optional[_Union[CudaIpcRef, _Mapping]] = ..., inline_data: _Optional[bytes] = ...) -> None: ...

class WorkingSetInfo(_message.Message):
    __slots__ = ("capacity", "n_sink", "retrieved", "window", "keys", "values", "slot_pos", "query", "min_window", "staged_keys", "staged_values", "staged_targets", "stages_every_row", "selection")
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    N_SINK_FIELD_NUMBER: _ClassVar[int]
    RETRIEVED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SLOT_POS_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    MIN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    STAGED_KEYS_FIELD_NUMBER: _ClassVar[int]
    STAGED_VALUES_FIELD_NUMBER: _ClassVar[int]
    STAGED_TARGETS_FIELD_NUMBER: _ClassVar[int]
    STAGES_EVERY_ROW_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    capacity: int
    n_sink: int
    retrieved: int
    window: int
    keys: TensorRef
    values: TensorRef
    slot_pos: TensorRef
    query: TensorRef
    min_window: int
    staged_keys: TensorRef
    staged_values: TensorRef
    staged_targets: TensorRef
    stages_every_row: bool
    selection: MappedSelection
    def __init__(self, capacity: _Optional[int] = ..., n_sink: _Optional[int] = ..., retrieved: _Optional[int] = ..., window: _Optional[int] = ..., keys: _Optional[_Union[TensorRef, _Mapping]] = ..., values: _Optional[_Union[TensorRef, _Mapping]] = ..., slot_pos: _Optional[_Union[TensorRef, _Mapping]] = ..., query: _Optional[_Union[TensorRef, _Mapping]] = ..., min_window: _Optional[int] = ..., staged_keys: _Optional[_Union[TensorRef, _Mapping]] = ..., staged_values: _Optional[_Union[TensorRef, _Mapping]] = ..., staged_targets: _Optional[_Union[TensorRef, _Mapping]] = ..., stages_every_row: bool = ..., selection: _Optional[_Union[MappedSelection, _Mapping]] = ...) -> None: ...

class MappedSelection(_message.Message):
    __slots__ = ("reps", "sizes", "position", "pinned", "chosen", "chosen_meta", "aggregate", "open_sum")
    REPS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_META_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    OPEN_SUM_FIELD_NUMBER: _ClassVar[int]
    reps: TensorRef
    sizes: TensorRef
    position: TensorRef
    pinned: TensorRef
    chosen: TensorRef
    chosen_meta: TensorRef
    aggregate: str
    open_sum: TensorRef
    def __init__(self, reps: _Optional[_Union[TensorRef, _Mapping]] = ..., sizes: _Optional[_Union[TensorRef, _Mapping]] = ..., position: _Optional[_Union[TensorRef, _Mapping]] = ..., pinned: _Optional[_Union[TensorRef, _Mapping]] = ..., chosen: _Optional[_Union[TensorRef, _Mapping]] = ..., chosen_meta: _Optional[_Union[TensorRef, _Mapping]] = ..., aggregate: _Optional[str] = ..., open_sum: _Optional[_Union[TensorRef, _Mapping]] = ...) -> None: ...

class WorkingSetDelta(_message.Message):
    __slots__ = ("slots", "positions", "keys", "values")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    slots: bytes
    positions: bytes
    keys: bytes
    values: bytes
    def __init__(self, slots: _Optional[bytes] = ..., positions: _Optional[bytes] = ..., keys: _Optional[bytes] = ..., values: _Optional[bytes] = ...) -> None: ...

class BoundaryRule(_message.Message):
    __slots__ = ("mode", "threshold", "pre_rope")
    MODE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PRE_ROPE_FIELD_NUMBER: _ClassVar[int]
    mode: BoundaryMode
    threshold: float
    pre_rope: bool
    def __init__(self, mode: _Optional[_Union[BoundaryMode, str]] = ..., threshold: _Optional[float] = ..., pre_rope: bool = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("worker_id", "layout", "policy", "transport", "lease_seconds", "tp_rank", "tp_size", "tag", "prefix", "deferred_eviction")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_EVICTION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    layout: ModelLayout
    policy: PolicyConfig
    transport: TransportKind
    lease_seconds: int
    tp_rank: int
    tp_size: int
    tag: str
    prefix: PrefixDeclaration
    deferred_eviction: bool
    def __init__(self, worker_id: _Optional[str] = ..., layout: _Optional[_Union[ModelLayout, _Mapping]] = ..., policy: _Optional[_Union[PolicyConfig, _Mapping]] = ..., transport: _Optional[_Union[TransportKind, str]] = ..., lease_seconds: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., tag: _Optional[str] = ..., prefix: _Optional[_Union[PrefixDeclaration, _Mapping]] = ..., deferred_eviction: bool = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "working_set", "spill_every", "boundary", "lease_seconds", "observation", "policy", "policy_config_json", "capability", "prefix_tokens_held", "prefix_id", "delta")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKING_SET_FIELD_NUMBER: _ClassVar[int]
    SPILL_EVERY_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_HELD_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    working_set: WorkingSetInfo
    spill_every: int
    boundary: BoundaryRule
    lease_seconds: int
    observation: int
    policy: str
    policy_config_json: str
    capability: str
    prefix_tokens_held: int
    prefix_id: str
    delta: WorkingSetDelta
    def __init__(self, session_id: _Optional[str] = ..., working_set: _Optional[_Union[WorkingSetInfo, _Mapping]] = ..., spill_every: _Optional[int] = ..., boundary: _Optional[_Union[BoundaryRule, _Mapping]] = ..., lease_seconds: _Optional[int] = ..., observation: _Optional[int] = ..., policy: _Optional[str] = ..., policy_config_json: _Optional[str] = ..., capability: _Optional[str] = ..., prefix_tokens_held: _Optional[int] = ..., prefix_id: _Optional[str] = ..., delta: _Optional[_Union[WorkingSetDelta, _Mapping]] = ...) -> None: ...

class IngestPromptRequest(_message.Message):
    __slots__ = ("session_id", "kv", "queries", "num_tokens", "first_layer", "capability")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kv: TensorRef
    queries: TensorRef
    num_tokens: int
    first_layer: int
    capability: str
    def __init__(self, session_id: _Optional[str] = ..., kv: _Optional[_Union[TensorRef, _Mapping]] = ..., queries: _Optional[_Union[TensorRef, _Mapping]] = ..., num_tokens: _Optional[int] = ..., first_layer: _Optional[int] = ..., capability: _Optional[str] = ...) -> None: ...

class IngestPromptResponse(_message.Message):
    __slots__ = ("resident_tokens", "host_tokens", "units", "delta", "seconds", "layers_done")
    RESIDENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HOST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_DONE_FIELD_NUMBER: _ClassVar[int]
    resident_tokens: int
    host_tokens: int
    units: int
    delta: WorkingSetDelta
    seconds: float
    layers_done: int
    def __init__(self, resident_tokens: _Optional[int] = ..., host_tokens: _Optional[int] = ..., units: _Optional[int] = ..., delta: _Optional[_Union[WorkingSetDelta, _Mapping]] = ..., seconds: _Optional[float] = ..., layers_done: _Optional[int] = ...) -> None: ...

class AppendNotice(_message.Message):
    __slots__ = ("upto", "kv")
    UPTO_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    upto: int
    kv: TensorRef
    def __init__(self, upto: _Optional[int] = ..., kv: _Optional[_Union[TensorRef, _Mapping]] = ...) -> None: ...

class BoundaryEvent(_message.Message):
    __slots__ = ("position", "layers", "query", "queries", "attend", "attend_scale")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    ATTEND_FIELD_NUMBER: _ClassVar[int]
    ATTEND_SCALE_FIELD_NUMBER: _ClassVar[int]
    position: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    query: TensorRef
    queries: TensorRef
    attend: TensorRef
    attend_scale: float
    def __init__(self, position: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., query: _Optional[_Union[TensorRef, _Mapping]] = ..., queries: _Optional[_Union[TensorRef, _Mapping]] = ..., attend: _Optional[_Union[TensorRef, _Mapping]] = ..., attend_scale: _Optional[float] = ...) -> None: ...

class ChunkAppend(_message.Message):
    __slots__ = ("start", "kv")
    START_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    start: int
    kv: TensorRef
    def __init__(self, start: _Optional[int] = ..., kv: _Optional[_Union[TensorRef, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("seq", "session_id", "append", "boundary", "chunk", "capability")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    seq: int
    session_id: str
    append: AppendNotice
    boundary: BoundaryEvent
    chunk: ChunkAppend
    capability: str
    def __init__(self, seq: _Optional[int] = ..., session_id: _Optional[str] = ..., append: _Optional[_Union[AppendNotice, _Mapping]] = ..., boundary: _Optional[_Union[BoundaryEvent, _Mapping]] = ..., chunk: _Optional[_Union[ChunkAppend, _Mapping]] = ..., capability: _Optional[str] = ...) -> None: ...

class AppendAck(_message.Message):
    __slots__ = ("spilled_upto", "evicted")
    SPILLED_UPTO_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    spilled_upto: int
    evicted: int
    def __init__(self, spilled_upto: _Optional[int] = ..., evicted: _Optional[int] = ...) -> None: ...

class RetrievalResult(_message.Message):
    __slots__ = ("units_selected", "tokens_placed", "tokens_gathered", "bytes_moved", "seconds", "staged_rows")
    UNITS_SELECTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PLACED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GATHERED_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGED_ROWS_FIELD_NUMBER: _ClassVar[int]
    units_selected: int
    tokens_placed: int
    tokens_gathered: int
    bytes_moved: int
    seconds: float
    staged_rows: int
    def __init__(self, units_selected: _Optional[int] = ..., tokens_placed: _Optional[int] = ..., tokens_gathered: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., seconds: _Optional[float] = ..., staged_rows: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("seq", "append", "retrieval", "delta", "attention")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    append: AppendAck
    retrieval: RetrievalResult
    delta: WorkingSetDelta
    attention: HostAttention
    def __init__(self, seq: _Optional[int] = ..., append: _Optional[_Union[AppendAck, _Mapping]] = ..., retrieval: _Optional[_Union[RetrievalResult, _Mapping]] = ..., delta: _Optional[_Union[WorkingSetDelta, _Mapping]] = ..., attention: _Optional[_Union[HostAttention, _Mapping]] = ...) -> None: ...

class HostAttention(_message.Message):
    __slots__ = ("out", "lse", "tokens", "seconds")
    OUT_FIELD_NUMBER: _ClassVar[int]
    LSE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    out: TensorRef
    lse: TensorRef
    tokens: int
    seconds: float
    def __init__(self, out: _Optional[_Union[TensorRef, _Mapping]] = ..., lse: _Optional[_Union[TensorRef, _Mapping]] = ..., tokens: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "capability")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    capability: str
    def __init__(self, session_id: _Optional[str] = ..., capability: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("host_bytes_freed", "device_bytes_freed")
    HOST_BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    host_bytes_freed: int
    device_bytes_freed: int
    def __init__(self, host_bytes_freed: _Optional[int] = ..., device_bytes_freed: _Optional[int] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("session_id", "capability")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    capability: str
    def __init__(self, session_id: _Optional[str] = ..., capability: _Optional[str] = ...) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("lease_seconds_left",)
    LEASE_SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    lease_seconds_left: int
    def __init__(self, lease_seconds_left: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("session_id", "capability")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    capability: str
    def __init__(self, session_id: _Optional[str] = ..., capability: _Optional[str] = ...) -> None: ...

class PoolStats(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "free_bytes", "kind")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    tier: str
    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    kind: str
    def __init__(self, tier: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., kind: _Optional[str] = ...) -> None: ...

class SessionStats(_message.Message):
    __slots__ = ("session_id", "worker_id", "policy", "prompt_tokens", "tokens", "steps", "boundaries", "appends", "bytes_host_to_device", "resident_tokens", "max_resident_tokens", "host_tokens", "units", "host_bytes", "device_bytes", "tag", "tp_rank", "tp_size", "metadata_bytes", "prefix_id", "prefix_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    APPENDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_HOST_TO_DEVICE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_RESIDENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HOST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    METADATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    worker_id: str
    policy: str
    prompt_tokens: int
    tokens: int
    steps: int
    boundaries: int
    appends: int
    bytes_host_to_device: int
    resident_tokens: int
    max_resident_tokens: int
    host_tokens: int
    units: int
    host_bytes: int
    device_bytes: int
    tag: str
    tp_rank: int
    tp_size: int
    metadata_bytes: int
    prefix_id: str
    prefix_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., policy: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., tokens: _Optional[int] = ..., steps: _Optional[int] = ..., boundaries: _Optional[int] = ..., appends: _Optional[int] = ..., bytes_host_to_device: _Optional[int] = ..., resident_tokens: _Optional[int] = ..., max_resident_tokens: _Optional[int] = ..., host_tokens: _Optional[int] = ..., units: _Optional[int] = ..., host_bytes: _Optional[int] = ..., device_bytes: _Optional[int] = ..., tag: _Optional[str] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., metadata_bytes: _Optional[int] = ..., prefix_id: _Optional[str] = ..., prefix_tokens: _Optional[int] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "sessions", "host_bytes", "device_bytes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    sessions: int
    host_bytes: int
    device_bytes: int
    def __init__(self, worker_id: _Optional[str] = ..., sessions: _Optional[int] = ..., host_bytes: _Optional[int] = ..., device_bytes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("pools", "sessions", "workers", "version", "device", "prefixes", "prefix_evictions")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PREFIXES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStats]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionStats]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStats]
    version: str
    device: str
    prefixes: _containers.RepeatedCompositeFieldContainer[PrefixStats]
    prefix_evictions: int
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolStats, _Mapping]]] = ..., sessions: _Optional[_Iterable[_Union[SessionStats, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerStats, _Mapping]]] = ..., version: _Optional[str] = ..., device: _Optional[str] = ..., prefixes: _Optional[_Iterable[_Union[PrefixStats, _Mapping]]] = ..., prefix_evictions: _Optional[int] = ...) -> None: ...

class PrefixDeclaration(_message.Message):
    __slots__ = ("fingerprint", "token_ids", "chunk_tokens", "chunk_hashes", "must_be_held")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_HASHES_FIELD_NUMBER: _ClassVar[int]
    MUST_BE_HELD_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    chunk_tokens: int
    chunk_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    must_be_held: bool
    def __init__(self, fingerprint: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., chunk_tokens: _Optional[int] = ..., chunk_hashes: _Optional[_Iterable[bytes]] = ..., must_be_held: bool = ...) -> None: ...

class PrefixStats(_message.Message):
    __slots__ = ("prefix_id", "worker_id", "policy", "tokens", "host_bytes", "device_bytes", "refs", "hits", "idle_seconds")
    PREFIX_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    prefix_id: str
    worker_id: str
    policy: str
    tokens: int
    host_bytes: int
    device_bytes: int
    refs: int
    hits: int
    idle_seconds: float
    def __init__(self, prefix_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., policy: _Optional[str] = ..., tokens: _Optional[int] = ..., host_bytes: _Optional[int] = ..., device_bytes: _Optional[int] = ..., refs: _Optional[int] = ..., hits: _Optional[int] = ..., idle_seconds: _Optional[float] = ...) -> None: ...

class StepEvent(_message.Message):
    __slots__ = ("session_id", "capability", "position", "notice", "retrieve", "follows", "worker_copies", "worker_selected")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_FIELD_NUMBER: _ClassVar[int]
    FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    WORKER_COPIES_FIELD_NUMBER: _ClassVar[int]
    WORKER_SELECTED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    capability: str
    position: int
    notice: bool
    retrieve: bool
    follows: int
    worker_copies: bool
    worker_selected: bool
    def __init__(self, session_id: _Optional[str] = ..., capability: _Optional[str] = ..., position: _Optional[int] = ..., notice: bool = ..., retrieve: bool = ..., follows: _Optional[int] = ..., worker_copies: bool = ..., worker_selected: bool = ...) -> None: ...

class BoundariesRequest(_message.Message):
    __slots__ = ("events", "background")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[StepEvent]
    background: bool
    def __init__(self, events: _Optional[_Iterable[_Union[StepEvent, _Mapping]]] = ..., background: bool = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("append", "retrieval", "table")
    APPEND_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    append: AppendAck
    retrieval: RetrievalResult
    table: MappedTableState
    def __init__(self, append: _Optional[_Union[AppendAck, _Mapping]] = ..., retrieval: _Optional[_Union[RetrievalResult, _Mapping]] = ..., table: _Optional[_Union[MappedTableState, _Mapping]] = ...) -> None: ...

class MappedTableState(_message.Message):
    __slots__ = ("units", "candidates", "open_start", "evicted")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    OPEN_START_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    units: int
    candidates: int
    open_start: int
    evicted: int
    def __init__(self, units: _Optional[int] = ..., candidates: _Optional[int] = ..., open_start: _Optional[int] = ..., evicted: _Optional[int] = ...) -> None: ...

class BoundariesResponse(_message.Message):
    __slots__ = ("results", "seconds", "groups", "queued_seconds", "serve_seconds", "sync_seconds")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SYNC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StepResult]
    seconds: float
    groups: int
    queued_seconds: float
    serve_seconds: float
    sync_seconds: float
    def __init__(self, results: _Optional[_Iterable[_Union[StepResult, _Mapping]]] = ..., seconds: _Optional[float] = ..., groups: _Optional[int] = ..., queued_seconds: _Optional[float] = ..., serve_seconds: _Optional[float] = ..., sync_seconds: _Optional[float] = ...) -> None: ...
