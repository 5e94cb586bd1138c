"""The pipeline config: typed (pydantic), loaded from YAML, overridable with dotted `--set` flags.

Defaults run on a laptop: the embedded Gemma 3 270M, a local Ray, CPU only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    model_validator,
)

from kore_ray.errors import InputError
from kore_ray.methods import METHODS


def _known_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return name


Method = Annotated[str, AfterValidator(_known_method)]  # a name in kore_ray.methods.METHODS
Generator = Literal["endpoint", "self", "extractive"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a YAML key is an error, not a no-op


def _absolute_model_path(spec: str) -> str:
    """A local model directory as an absolute path: Ray Train workers run in a directory of
    their own, where a relative path names nothing."""
    from kore_ray.models.gemma import NAME

    if spec == NAME or "://" in spec or not Path(spec).expanduser().exists():
        return spec  # embedded, a URI, or missing (refused with a clear error when loaded)
    return str(Path(spec).expanduser().resolve())


class ModelConfig(_Section):
    # embedded name, HF directory (made absolute) or object-store URI
    name_or_path: Annotated[str, AfterValidator(_absolute_model_path)] = "gemma-3-270m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DataConfig(_Section):
    knowledge: str | None = None  # KnowledgeItem JSONL/Parquet
    eval_questions: str | None = None  # EvalQuestion JSONL/Parquet
    retention: str | None = None  # RetentionProbe / Conversation / text for the covariance
    retention_eval: str | None = None  # RetentionProbe for measuring retention


class AugmentConfig(_Section):
    # Fact-level Q&A generators (augment/): "endpoint" (dialogues from base_url), "self" (the
    # base model itself, served for the stage), "extractive" (text spans, no model). None:
    # endpoint + extractive when base_url is set, else self + extractive.
    generators: list[Generator] | None = None
    base_url: str | None = None  # OpenAI-compatible endpoint for the "endpoint" generator
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never logged
    templates_per_item: PositiveInt = 1  # "tell me about X" -> the paragraph
    # The self generator: sampled candidates per item, their length, and which items it asks
    # about ("without_qa": only items that bring no Q&A of their own).
    self_candidates: PositiveInt = 3
    self_max_tokens: PositiveInt = 96
    self_temperature: float = Field(0.8, ge=0, le=2)
    self_items: Literal["all", "without_qa"] = "all"
    verify: bool = True  # round trip: the model must answer a self-written question the same
    dialogues_per_item: int = Field(2, ge=0)
    min_actors: PositiveInt = 1
    max_actors: PositiveInt = 4
    concurrency_per_actor: PositiveInt = 8  # requests in flight per actor
    num_cpus_per_actor: float = Field(0.25, gt=0)  # the actors wait on the network, not the CPU
    requests_per_second: float | None = Field(None, gt=0)  # all actors together
    max_retries: int = Field(4, ge=0)
    backoff_s: float = Field(0.5, gt=0)  # first retry waits 0.5-1x this, doubling each time
    backoff_max_s: float = Field(30.0, gt=0)  # also caps a server's Retry-After
    timeout_s: float = Field(60.0, gt=0)
    # structured output: a JSON schema, plain JSON mode, or the prompt alone (any endpoint)
    response_format: Literal["json_schema", "json_object", "none"] = "json_schema"
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: PositiveInt = 1024
    dedup_threshold: float = Field(0.8, gt=0, le=1)  # word-set Jaccard of questions and answers
    seed: int = 0

    @model_validator(mode="after")
    def _actors(self):
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        if "endpoint" in (self.generators or ()) and not self.base_url:
            raise ValueError("generator 'endpoint' needs augment.base_url")
        return self

    def active_generators(self) -> list[str]:
        if self.generators is not None:
            return list(self.generators)
        return ["endpoint", "extractive"] if self.base_url else ["self", "extractive"]


class CovarianceConfig(_Section):
    batch_size: PositiveInt = 8  # sequences per forward pass (micro-batch) inside an actor
    max_length: PositiveInt = 256  # tokens per sequence; longer text is truncated
    num_actors: PositiveInt = 1  # model replicas; one GPU each when use_gpu
    # GPUs per actor when use_gpu: above 1 the model is split over them layer by layer
    # (device_map="auto"), for weights plus sums beyond one GPU (70B; docs/DESIGN.md).
    gpus_per_actor: PositiveInt = 1
    # Sequences per Ray task: the unit an actor is handed, and redone when an actor is lost.
    sequences_per_task: PositiveInt = 256
    # Each actor saves its sums to the run directory this often (and at the end): a lost
    # actor loses at most this much work. A save writes every target group (8 d^2 bytes each).
    flush_interval_s: float = Field(600.0, ge=0)
    num_reducers: PositiveInt = 2  # tasks that add the actors' saved sums, a shard of groups each
    # Passes over the data, each summing a shard of the target groups: an actor then holds
    # 1/passes of the store (70B widths need this; see docs/DESIGN.md, memory model).
    passes: PositiveInt = 1
    use_gpu: bool | None = None  # None: a GPU per actor when the cluster has GPUs
    # "none": raw x x^T; "sample_max": each sample divided by its |max| (KORE reference code).
    normalize: Literal["none", "sample_max"] = "none"
    add_to: str | None = None  # an existing store (same model) to add this data to


class InitConfig(_Section):
    method: Method = "kore"
    rank: PositiveInt = 64
    ranks: dict[str, PositiveInt] = {}  # per target-group overrides
    target_modules: list[str] | None = None  # short names, e.g. [q_proj, v_proj]; None = all


class TrainConfig(_Section):
    learning_rate: float = Field(5e-4, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # after the warmup
    warmup_steps: int = Field(0, ge=0)  # linear ramp from lr/warmup_steps up to lr
    # Off by default: weight decay pulls KORE's B towards 0 rather than towards its init B0.
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping (the norm is still logged)
    # Passes over the conversations. Facts need several: on 30 paragraph-only held-out items
    # (15 conversations each) KORE answered 0.37-0.43 of the questions after 2.2 passes and
    # 0.48-0.63 after 4-4.3 (README, "Exposures"); after 1, almost none.
    epochs: PositiveInt = 4
    max_steps: int | None = Field(None, gt=0)  # when set, overrides epochs (data repeats as needed)
    batch_size: PositiveInt = 8  # GLOBAL batch (sequences per optimizer step), any num_workers
    micro_batch_size: PositiveInt | None = None  # per forward pass on a worker; None: its share
    max_length: PositiveInt = 256
    # Text rows of a micro-batch in one sequence, no padding (transformers' padding-free format;
    # images are always padded). Off only for a model whose attention ignores position_ids.
    packing: bool = True
    num_workers: PositiveInt = 1  # must divide batch_size
    cpus_per_worker: PositiveInt = 1  # on CPU also the worker's torch threads
    use_gpu: bool = False  # one GPU per worker, nccl, bfloat16 base weights
    # bfloat16 autocast of forward and backward (weights and optimizer stay float32 on CPU).
    # auto: on where bfloat16 matmuls are fast, a GPU or a CPU with AMX or AVX512-BF16 (1.8x
    # faster steps on paragraphs there, none on short Q&A rows); elsewhere CPU bfloat16 is
    # slower than float32, so auto leaves it off.
    # (YAML reads a bare `off` as false: both mean off.)
    autocast: Annotated[Literal["auto", "bfloat16", "off"],
                        BeforeValidator(lambda v: "off" if v is False else v)] = "auto"
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp needs use_gpu
    activation_checkpointing: bool = False  # recompute in backward: less memory, ~30% slower
    checkpoint_every: PositiveInt = 50  # steps; the last step is always checkpointed
    keep_checkpoints: PositiveInt = 2
    max_failures: int = Field(3, ge=-1)  # restarts from the latest checkpoint; -1: no limit
    run_name: str | None = None  # Ray Train run name; None: "<run_dir name>-<method>" (resumable)
    seed: int = 0


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: PositiveInt = 8000
    # Adapters to serve, one subdirectory each (the name is the request's model): a directory
    # or an object-store prefix; None: <run_dir>/adapter, where `kore export` writes them.
    adapters: str | None = None
    served_model_name: str | None = None  # the base model's name in requests; None: model.name_or_path
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 256  # vLLM's allowed values
    max_loras: PositiveInt = 4  # adapters in one batch
    max_cpu_loras: PositiveInt | None = None  # adapters kept loaded; None: max_loras
    max_model_len: PositiveInt | None = None  # None: the model's own context length
    kv_cache_gib: float | None = Field(2.0, gt=0)  # None: vLLM's default (GPU memory fraction)
    adapter_rescan_s: float = Field(10.0, ge=0)  # a request rescans adapters at most this often
    num_cpus: float = Field(1.0, ge=0)  # Ray's accounting per replica; vLLM's threads use the node
    use_gpu: bool = False  # one GPU per replica (the `gpu` extra's vLLM)
    # CPU engine: cores vLLM keeps free of its compute threads (None: vLLM's default, one).
    # On a 2-core laptop 0 lets it compute on both: 1.3x faster generation measured.
    cpu_reserved_cores: int | None = Field(None, ge=0)
    min_replicas: PositiveInt = 1
    max_replicas: PositiveInt = 1
    max_ongoing_requests: PositiveInt = 32  # per replica; more wait in Serve's queue
    target_ongoing_requests: PositiveInt = 16  # autoscaling adds replicas above this per replica
    auth_token_env: str | None = None  # bearer token read from this variable; None: no auth
    # More `vllm serve` flags, passed to vLLM's own parser, e.g. ["--enable-prefix-caching"]
    vllm_args: list[str] = []

    @model_validator(mode="after")
    def _replicas(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            # vLLM refuses this too, but only inside the replica, after the model has loaded
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) < max_loras "
                             f"({self.max_loras}): the adapters kept loaded must hold one batch's")
        return self


class EvaluateConfig(_Section):
    methods: list[Method] = ["kore", "lora"]
    max_new_tokens: PositiveInt = 16


class ContinualBatch(_Section):
    name: str  # for people: "2026-12-01", "day 2"
    knowledge: str  # KnowledgeItem JSONL/Parquet of this batch
    eval_questions: str  # EvalQuestion JSONL/Parquet about this batch's items


class GateConfig(_Section):
    """A version is published only if it meets every threshold that is set (None: not checked)."""

    min_retention: float | None = Field(0.8, ge=0, le=1)  # of the base's known facts
    min_adaptation: float | None = Field(None, ge=0, le=1)  # CEM on the version's own batch
    max_drop: float | None = Field(0.05, ge=0, le=1)  # CEM lost on any earlier batch


class ContinualConfig(_Section):
    """`kore continual`: knowledge in ordered batches, one version per batch and track."""

    batches: list[ContinualBatch] = []
    # kore: null space of retention + earlier batches; kore_no_history: of retention only
    # (the ablation); lora: sequential LoRA. See kore_ray/continual/continual_stage.py.
    tracks: list[Literal["kore", "kore_no_history", "lora"]] = ["kore", "kore_no_history", "lora"]
    gate: GateConfig = GateConfig()


class TrackingConfig(_Section):
    # MLflow: one run per method (settings, per-step training metrics, evaluation figures,
    # report and plots), logged when the evaluation finishes.
    mlflow: bool = True
    uri: str | None = None  # None: a local store, <run_dir>/mlruns; or a server's http(s)://...
    experiment: str = "kore-ray"


class PipelineConfig(_Section):
    # A local path, or on a cluster a filesystem every node mounts (NFS, EFS, ...): the stages
    # use plain file I/O and Ray Train keeps its checkpoints there. Not an object-store URI.
    run_dir: str = "runs/demo"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    covariance: CovarianceConfig = CovarianceConfig()
    init: InitConfig = InitConfig()
    train: TrainConfig = TrainConfig()
    serve: ServeConfig = ServeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    continual: ContinualConfig = ContinualConfig()
    tracking: TrackingConfig = TrackingConfig()
    # Per-method overrides of any section, e.g. {lora: {train: {learning_rate: 1e-4}}}: methods
    # are compared at their own best settings (the adaptation/retention frontier), not one shared.
    methods: dict[Method, dict] = {}

    @model_validator(mode="after")
    def _local_run_dir(self):
        if "://" in self.run_dir:
            raise ValueError(f"run_dir {self.run_dir!r}: object-store run directories are not "
                             "supported; use a path every node mounts (NFS, EFS, ...)")
        return self

    def check_servable(self, methods: list[str]) -> None:
        """Refuse, before any training, a method whose export the server cannot load."""
        for name in dict.fromkeys(methods):
            cfg = self.for_method(name)  # with its own overrides
            rank = METHODS[name].export_rank(max([cfg.init.rank, *cfg.init.ranks.values()]))
            if rank is not None and rank > cfg.serve.max_lora_rank:
                raise InputError(
                    f"{name} exports rank {rank} at init.rank {cfg.init.rank}, above "
                    f"serve.max_lora_rank {cfg.serve.max_lora_rank}: raise serve.max_lora_rank "
                    "(vLLM's values: 8-512) or lower the rank")

    def for_method(self, method: str) -> PipelineConfig:
        """This config with `methods[method]`'s overrides applied (and validated)."""
        overrides = self.methods.get(method)
        if not overrides:
            return self
        tree = self.model_dump()
        _deep_merge(tree, overrides, path=f"methods.{method}")
        try:
            return PipelineConfig.model_validate(tree)
        except ValidationError as e:
            raise InputError(f"methods.{method}: invalid override: {e}") from e


def _deep_merge(tree: dict, overrides: dict, path: str) -> None:
    for key, value in overrides.items():
        if key == "methods":
            raise InputError(f"{path}: a method's overrides cannot set methods")
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_merge(tree[key], value, f"{path}.{key}")
        else:
            tree[key] = value


def _apply_override(tree: dict, dotted: str) -> None:
    if "=" not in dotted:
        raise InputError(f"override {dotted!r} must look like section.key=value")
    key, raw = dotted.split("=", 1)
    value = yaml.safe_load(raw) if raw else None  # YAML typing: 1e-3, true, [a, b]
    node = tree
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InputError(f"override {dotted!r}: {part} is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML config (or the defaults), apply `section.key=value` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise InputError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(tree, item)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        where = path or "config"
        lines = [": ".join([str(where), *filter(None, [".".join(map(str, err["loc"]))]), err["msg"]])
                 for err in e.errors()]
        raise InputError("invalid config:\n  " + "\n  ".join(lines)) from e
