"""The command line, the one way serve_app starts (``make serve`` and the KServe runtime use it).

``python -m serve_app --config configs/local.yaml`` serves a Serve config file;
``python -m serve_app --model_name embedding --model_id ID --task text_embedding`` takes KServe's
flags, started the way KServe starts ``python -m huggingfaceserver``. Either way
:func:`serve_app.launch.lifecycle.serve` runs it in Ray Serve's high-throughput mode.

Flags keep KServe's names and defaults. Flags that only tune KServe's own server are accepted and
have no effect (listed under "accepted for compatibility"); flags whose behaviour serve_app does
not reproduce are refused, so no InferenceService silently gets different vectors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from serve_app.config.schema import (
    AppConfig,
    AuthOptions,
    BatchOptions,
    DeploymentOptions,
    IngressOptions,
    ModelConfig,
    Pooling,
    Precision,
)
from serve_app.config.serve_yaml import read_serve_config, serve_config
from serve_app.config.variants import VariantOptions
from serve_app.types import Task

#: KServe's --task values served here, and the model task each means
SUPPORTED_TASKS: dict[str, Task] = {"text_embedding": "embedding", "rerank": "rerank",
                                     "sequence_classification": "classify",
                                     "text_classification": "classify"}
DASHBOARD_HELP = ("Also start Ray's dashboard (port 8265; `serve deploy` and `serve status` "
                  "need it). Off by default: its processes hold about 1 GB.")
#: --backend values, KServe's included, and the engine each means
_BACKENDS = {"auto": "auto", "huggingface": "torch", "torch": "torch",
             "onnxruntime": "onnxruntime", "openvino": "openvino"}
_DTYPES = {"auto": "auto", "float32": "float32", "float": "float32", "float16": "float16",
           "half": "float16", "bfloat16": "bfloat16"}
_REFUSED = {
    "--disable_lower_case": "the tokenizer's own lower-casing is always used",
    "--disable_special_tokens": "special tokens are part of every embedding model's input",
    "--return_token_type_ids": "embedding responses carry no token type ids",
    "--tensor_input_names": "inputs are always the tokenizer's ids and attention mask",
    "--predictor_host": "serve_app runs the model itself; there is no separate predictor",
    "--tokenizer_revision": "the tokenizer is loaded from the model's own files, at "
                            "--model_revision",
}

class _Refuse(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        flag = self.option_strings[0]
        parser.error(f"{flag} is not supported: {_REFUSED[flag]}")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve_app",
        description="Serve a HuggingFace text-embedding or reranking model (KServe "
        "huggingfaceserver flags).",
        allow_abbrev=False,
    )
    p.add_argument("--model_name", default="model", help="Name clients use (KServe: 'model').")
    p.add_argument("--model_id", default=None, help="Hub id, local dir or model package.")
    p.add_argument("--model_dir", default="/mnt/models",
                   help="Local model directory, used when --model_id is not given.")
    p.add_argument("--model_revision", default=None, help="Hub revision of the model.")
    p.add_argument("--trust_remote_code", action="store_true", help="Allow hub model code.")
    p.add_argument("--max_length", "--max_model_len", dest="max_length", type=int, default=None,
                   help="Token limit (default: the model's max_seq_length).")
    p.add_argument("--dtype", default="auto", choices=sorted(_DTYPES),
                   help="auto: float16 on GPU, float32 on CPU.")
    p.add_argument("--task", default="text_embedding",
                   help=f"One of {', '.join(SUPPORTED_TASKS)} (rerank: a one-label "
                   "cross-encoder; sequence_classification: any sequence classifier). A "
                   "SPLADE model embeds with --pooling splade.")
    p.add_argument("--pooling", default="auto", choices=list(get_args(Pooling)),
                   help="How an embedding model pools its tokens (auto: as its files say); "
                   "splade serves a SPLADE model's sparse vectors (text-embeddings-inference's "
                   "flag).")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--return_probabilities", action="store_true",
                     help="A classifier's KServe V1/V2 answers: each label's probability "
                     "instead of the best label's index (KServe's flag).")
    out.add_argument("--return_raw_logits", action="store_true",
                     help="A classifier's KServe V1/V2 answers: each label's logit (KServe's "
                     "flag).")
    p.add_argument("--backend", default="auto", choices=sorted(_BACKENDS),
                   help="The engine: torch, onnxruntime or openvino (huggingface, KServe's "
                   "name for transformers, is torch). auto: torch on GPU, on CPU the fastest "
                   "installed for the precision.")
    p.add_argument("--precision", default="auto", choices=list(get_args(Precision)),
                   help="exact: float32 math; fast: bfloat16/float16 where the hardware has "
                   "it; int8: dynamically quantized matmuls on onnxruntime (CPU). auto: exact "
                   "on CPU, fast on GPU.")
    p.add_argument("--min_fidelity", type=float, default=None,
                   help="Least cosine to float32 torch a replica accepts at warm-up (default "
                   "0.99999 exact, 0.9999 fast, 0.97 int8).")
    p.add_argument("--http_port", type=int, default=8080, help="HTTP port (KServe: 8080).")
    p.add_argument("--grpc_port", type=int, default=8081, help="gRPC port (KServe: 8081).")
    p.add_argument("--host", default="0.0.0.0",
                   help="Address to bind (a container's default; use 127.0.0.1 locally).")
    p.add_argument("--workers", type=int, default=1, help="Ingress replicas.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num_replicas", type=int, default=1, help="Model replicas.")
    p.add_argument("--num_cpus", type=float, default=None,
                   help="CPUs per model replica (default: all CPUs Ray sees).")
    p.add_argument("--num_gpus", type=float, default=None,
                   help="GPUs per model replica (default: 1 when CUDA is present, else 0).")
    p.add_argument("--variants_dir", default=None,
                   help="Checkpoints fine-tuned from the model, one sub-directory each: each is "
                   "served under the sub-directory's name, loaded on first use.")
    p.add_argument("--max_loaded_variants", type=int, default=4,
                   help="Variants one model replica holds at once (least recently used go).")
    p.add_argument("--max_batch_size", type=int, default=BatchOptions().max_batch_size)
    p.add_argument("--batch_wait_timeout_s", type=float,
                   default=BatchOptions().batch_wait_timeout_s)
    p.add_argument("--api_keys_file", default=None,
                   help="Require 'Authorization: Bearer <key>' with a key from this file.")
    p.add_argument("--api_keys_env", default=None,
                   help="Require API keys, read from this environment variable.")
    p.add_argument("--dashboard", action="store_true", help=DASHBOARD_HELP)

    compat = p.add_argument_group("accepted for compatibility with KServe (no effect)")
    for flag in ("--enable_grpc", "--enable_docs_url", "--enable_latency_logging",
                 "--configure_logging"):
        compat.add_argument(flag, nargs="?", const="true", default=None)
    for flag in ("--max_threads", "--max_asyncio_workers", "--max_log_len", "--max-log-len"):
        compat.add_argument(flag, type=int, default=None)
    for flag in ("--log_config_file", "--access_log_format", "--predictor_protocol"):
        compat.add_argument(flag, default=None)
    compat.add_argument("--disable_log_requests", action="store_true",
                        help="Request texts are never logged anyway.")

    refused = p.add_argument_group("refused (behaviour serve_app does not reproduce)")
    for flag in _REFUSED:
        refused.add_argument(flag, nargs="?", action=_Refuse, help=_REFUSED[flag])
    return p

def _model_source(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    if args.model_id:
        return str(args.model_id)
    if "://" in args.model_dir:
        parser.error(f"--model_dir {args.model_dir!r}: only local directories are supported; "
                     "let KServe's storage initializer download to /mnt/models")
    if not Path(args.model_dir).is_dir():
        parser.error(f"--model_dir {args.model_dir!r} does not exist; pass --model_id or a "
                     "directory holding the model")
    return str(args.model_dir)

def config_from_args(
    argv: Sequence[str] | None = None, cpus: float | None = None, gpus: float = 0.0
) -> tuple[AppConfig, argparse.Namespace]:
    """Parse KServe-style flags into the one app config. ``cpus``/``gpus``: what the node has."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task not in SUPPORTED_TASKS:
        parser.error(f"--task {args.task!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_TASKS)}")
    model_id = _model_source(args, parser)
    task = SUPPORTED_TASKS[args.task]
    if args.pooling == "splade":
        if task != "embedding":
            parser.error(f"--pooling splade embeds (a SPLADE model); not with --task {args.task}")
        task = "sparse"
    num_cpus = args.num_cpus if args.num_cpus is not None else max(1.0, float(cpus or 1))
    num_gpus = args.num_gpus if args.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    try:
        model = ModelConfig(
            name=args.model_name,
            model_id=model_id,
            model_revision=args.model_revision,
            task=task,
            pooling=args.pooling,
            kserve_output=("probabilities" if args.return_probabilities else
                           "logits" if args.return_raw_logits else "label"),
            trust_remote_code=args.trust_remote_code,
            max_length=args.max_length,
            dtype=_DTYPES[args.dtype],
            backend=_BACKENDS[args.backend],
            precision=args.precision,
            min_fidelity=args.min_fidelity,
            device=args.device,
            batching=BatchOptions(
                max_batch_size=args.max_batch_size,
                batch_wait_timeout_s=args.batch_wait_timeout_s,
            ),
            deployment=DeploymentOptions(
                num_replicas=args.num_replicas, num_cpus=num_cpus, num_gpus=num_gpus
            ),
            variants=None if args.variants_dir is None else VariantOptions(
                directory=args.variants_dir, max_loaded=args.max_loaded_variants),
        )
        cfg = AppConfig(
            models=[model],
            ingress=IngressOptions(num_replicas=args.workers),
            auth=AuthOptions(api_keys_file=args.api_keys_file, api_keys_env=args.api_keys_env),
        )
    except ValueError as e:
        parser.error(str(e))
    return cfg, args

def kserve_deploy(cfg: AppConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The Serve config the KServe-style flags stand for: one application at ``/``."""
    return serve_config(cfg.model_dump(mode="json"), args.host, args.http_port, args.grpc_port)

def config_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve_app --config",
        description="Serve a Serve config file (serve run's format) the fast way.",
        allow_abbrev=False,
    )
    p.add_argument("--config", required=True, help="Serve config file, e.g. configs/local.yaml.")
    p.add_argument("--dashboard", action="store_true", help=DASHBOARD_HELP)
    return p

def _grace_s(cfg: AppConfig) -> float:
    """How long a stop waits for requests in flight: the longest graceful shutdown timeout of
    the app's deployments (the ingress's holds colocated models)."""
    return max(d.graceful_shutdown_timeout_s
               for d in (cfg.ingress, *(m.deployment for m in cfg.models)))

def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.launch.lifecycle import serve

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        parser = config_parser()
        options = parser.parse_args(argv)
        try:
            config, apps = read_serve_config(options.config)
        except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
            parser.error(str(e))
        grace = max((_grace_s(a) for a in apps.values()), default=20.0)
        return serve(lambda _: config, options.dashboard, grace)

    cfg, args = config_from_args(argv)  # fail on bad flags before starting Ray

    def deploy(resources: dict[str, float]) -> dict[str, Any]:
        cfg, _ = config_from_args(argv, cpus=resources.get("CPU", 1.0),
                                  gpus=resources.get("GPU", 0.0))
        return kserve_deploy(cfg, args)

    return serve(deploy, args.dashboard, _grace_s(cfg))

if __name__ == "__main__":
    sys.exit(main())
