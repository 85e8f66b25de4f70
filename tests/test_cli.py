"""The KServe-compatible command line: flags, refusals, and a real start."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from serve_app.config.schema import AppConfig
from serve_app.launch.cli import build_parser, config_from_args, kserve_deploy, main
from tests.helpers import BIN, SENTENCE, free_port, running

KSERVE_ARGS = ["--model_name", "embedding", "--model_id", "sentence-transformers/all-MiniLM-L6-v2",
               "--task", "text_embedding"]


def test_kserve_defaults():
    args = build_parser().parse_args([])
    assert (args.model_name, args.http_port, args.grpc_port, args.model_dir) == (
        "model", 8080, 8081, "/mnt/models")


def test_kserve_flags_map_to_the_app_config():
    extra = ["--max_length", "128", "--dtype", "float", "--model_revision", "main",
             "--trust_remote_code", "--workers", "2"]
    cfg, _ = config_from_args([*KSERVE_ARGS, *extra], cpus=4)
    (m,) = cfg.models
    assert (m.name, m.model_id, m.max_length, m.dtype, m.model_revision) == (
        "embedding", "sentence-transformers/all-MiniLM-L6-v2", 128, "float32", "main")
    assert m.trust_remote_code and cfg.ingress.num_replicas == 2
    assert m.deployment.num_cpus == 4 and m.deployment.num_gpus == 0


def test_task_rerank_serves_a_reranker():
    cfg, _ = config_from_args(["--model_name", "reranker", "--model_id", "/models/ce",
                               "--task", "rerank"])
    assert cfg.models[0].task == "rerank"
    assert config_from_args(KSERVE_ARGS)[0].models[0].task == "embedding"


def test_variants_dir_serves_each_checkpoint_under_its_name(tmp_path):
    for name in ("support", "legal"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    cfg, args = config_from_args([*KSERVE_ARGS, "--variants_dir", str(tmp_path),
                                  "--max_loaded_variants", "2"])
    variants = cfg.models[0].variants
    assert variants is not None and variants.max_loaded == 2
    assert list(variants.sources) == ["legal", "support"]
    again = AppConfig.model_validate(kserve_deploy(cfg, args)["applications"][0]["args"])
    assert again.models[0].variant_names == ["legal", "support"] and not again.colocated
    with pytest.raises(SystemExit):
        config_from_args([*KSERVE_ARGS, "--variants_dir", str(tmp_path / "none")])


def test_gpu_node_gets_a_gpu_replica():
    cfg, _ = config_from_args(KSERVE_ARGS, cpus=8, gpus=1)
    assert cfg.models[0].deployment.num_gpus == 1


def test_compatibility_flags_are_accepted():
    extra = ["--enable_grpc", "true", "--disable_log_requests", "--max_log_len", "100",
             "--configure_logging", "--max_model_len", "64"]
    cfg, args = config_from_args([*KSERVE_ARGS, *extra])
    assert (args.enable_grpc, args.disable_log_requests, args.max_log_len,
            args.configure_logging) == ("true", True, 100, "true")
    # no effect on what is served, but --max_model_len's (KServe's name for --max_length)
    plain, _ = config_from_args([*KSERVE_ARGS, "--max_length", "64"])
    assert cfg == plain and cfg.models[0].max_length == 64


@pytest.mark.parametrize(("flags", "backend", "precision", "floor"), [
    ([], "auto", "auto", None),
    (["--backend", "huggingface"], "torch", "auto", None),  # KServe's name for transformers
    (["--backend", "openvino", "--precision", "fast"], "openvino", "fast", None),
    (["--backend", "onnxruntime", "--min_fidelity", "0.999"], "onnxruntime", "auto", 0.999),
])
def test_engine_flags(flags, backend, precision, floor):
    cfg, _ = config_from_args([*KSERVE_ARGS, *flags])
    m = cfg.models[0]
    assert (m.backend, m.precision, m.min_fidelity) == (backend, precision, floor)


def test_a_torch_dtype_with_another_backend_is_refused(capsys):
    with pytest.raises(SystemExit):
        config_from_args([*KSERVE_ARGS, "--backend", "openvino", "--dtype", "bfloat16"])
    assert "precision" in capsys.readouterr().err


def test_api_key_flags(tmp_path):
    cfg, _ = config_from_args([*KSERVE_ARGS, "--api_keys_env", "MY_KEYS",
                               "--api_keys_file", str(tmp_path / "k")])
    assert (cfg.auth.api_keys_env, cfg.auth.api_keys_file) == ("MY_KEYS", str(tmp_path / "k"))


def test_model_dir_is_used_without_model_id(tmp_path):
    cfg, _ = config_from_args(["--model_dir", str(tmp_path)])
    assert cfg.models[0].model_id == str(tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "fill_mask"],
         "--task 'fill_mask' is not supported; supported: text_embedding, rerank"),
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (["--model_nam", "x"], "unrecognized arguments"),  # no silent abbreviations
        (["--disable_special_tokens"], "--disable_special_tokens is not supported"),
        (["--return_probabilities", "--model_id", "x"], "shapes a classifier's answers"),
        (["--return_probabilities", "--return_raw_logits"], "not allowed with argument"),
        (["--pooling", "splade", "--task", "rerank", "--model_id", "x"],
         "--pooling splade embeds"),
        (["--backend", "vllm"], "invalid choice"),
        (["--dtype", "int8"], "invalid choice"),
        (["--model_dir", "s3://bucket/model"], "only local directories are supported"),
        (["--model_dir", "/does/not/exist"], "does not exist"),
        (["--model_name", "bad/name", "--model_id", "x"], "model name must be"),
    ],
)
def test_bad_flags_are_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("config", "message"), [
    ("applications:\n  - name: serve_app\n    import_path: serve_app.serve:build_app\n"
     "    args: {modles: []}\n", "modles"),  # a misspelled key: refused before Ray starts
    ("applications: []\n", "lists no applications"),
    ("applications:\n  - name: serve_app\n    import_path: serve_app.serve:build_app\n"
     "    args: {topology: fused}\n", "topology"),
])
def test_bad_config_files_are_refused_before_ray_starts(tmp_path, capsys, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the config path takes no model flags
        main(["--config", str(path), "--model_id", "x"])
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "missing.yaml")])


def test_kserve_flags_become_one_serve_config():
    cfg, args = config_from_args(["--model_name", "e", "--model_id", "m", "--http_port", "9",
                                  "--grpc_port", "10",
                                  "--host", "127.0.0.1"], cpus=2)
    deploy = kserve_deploy(cfg, args)
    assert deploy["http_options"] == {"host": "127.0.0.1", "port": 9}
    assert deploy["grpc_options"]["port"] == 10
    (app,) = deploy["applications"]
    assert app["import_path"] == "serve_app.serve:build_app" and app["route_prefix"] == "/"
    assert AppConfig.model_validate(app["args"]) == cfg  # survives the trip through JSON
    assert AppConfig.model_validate(app["args"]).colocated  # one CPU model: the fast shape


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory):
    """``python -m serve_app`` with KServe's flags on loopback, two ingress replicas
    (``--workers 2``: the drain below reaches both). The last test here stops it."""
    port, grpc_port = free_port(), free_port()
    cmd = [str(BIN / "python"), "-m", "serve_app", *KSERVE_ARGS, "--host", "127.0.0.1",
           "--http_port", str(port), "--grpc_port", str(grpc_port), "--num_cpus", "1",
           "--workers", "2"]
    log = tmp_path_factory.mktemp("cli") / "cli.log"
    with running(cmd, f"http://127.0.0.1:{port}", log) as server:
        server.grpc = f"127.0.0.1:{grpc_port}"
        yield server


@pytest.mark.e2e
def test_cli_serves_like_kserve(kserve_server, engine):
    url = kserve_server
    r = httpx.post(f"{url}/openai/v1/embeddings", json={"model": "embedding", "input": SENTENCE})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["data"][0]["embedding"],
                               engine.embed([SENTENCE])[0][0], atol=1e-6)
    assert r.json()["usage"]["prompt_tokens"] == 8
    v1 = httpx.post(f"{url}/v1/models/embedding:predict", json={"instances": ["hi"]})
    assert v1.status_code == 200 and len(v1.json()["predictions"][0]) == 384
    client = triton_grpc.InferenceServerClient(kserve_server.grpc)  # --grpc_port
    text = triton_grpc.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=object))
    out = client.infer("embedding", [text]).as_numpy("output-0")
    np.testing.assert_array_equal(out[0], np.array(v1.json()["predictions"][0], np.float32))


@pytest.mark.e2e
def test_sigterm_finishes_requests_in_flight_then_stops(kserve_server):
    """As KServe's server does: on SIGTERM readiness turns false at once, on every ingress
    replica (``--workers 2``; HAProxy spreads the probes over both), and the requests in flight
    still get their answers before the process exits (0)."""
    server = kserve_server
    long_text = "word " * 400  # cut at the model's 256 tokens
    # The work in flight is sized to this machine: about 4 s of compute in all, long enough to
    # outlast the readiness probes below and well inside the 20 s graceful shutdown even on a
    # machine several times slower than the one measured (CI's are, and share their cores).
    sample = 8
    t0 = time.perf_counter()
    r = httpx.post(f"{server}/v1/embeddings", timeout=60,
                   json={"model": "embedding", "input": [long_text] * sample})
    assert r.status_code == 200, r.text
    per_text = (time.perf_counter() - t0) / sample
    per_request = max(1, min(32, round(4.0 / per_text / 3)))
    held = 3 * per_request

    async def main() -> tuple[list[httpx.Response], list[int]]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            body = {"model": "embedding", "input": [long_text] * per_request}
            flight = [asyncio.create_task(c.post("/v1/embeddings", json=body))
                      for _ in range(3)]
            # until the model replica (one: --workers are ingress replicas) holds all three
            # (admitted, tokenizing or computing)
            stats = "/v2/models/embedding/stats"
            deadline = time.monotonic() + 60
            while (await c.get(stats)).json()["model_stats"][0]["queued_inputs"] < held:
                assert not any(f.done() for f in flight)
                assert time.monotonic() < deadline, "the requests never reached the model"
                await asyncio.sleep(0.05)  # polling interval
            server.proc.send_signal(signal.SIGTERM)
            probes: list[int] = []
            for _ in range(50):  # readiness turns false while the requests still run
                await asyncio.sleep(0.1)
                probes.append((await c.get("/v2/health/ready")).status_code)
                if probes[-6:] == [503] * 6:
                    break
            return await asyncio.gather(*flight), probes

    answers, probes = asyncio.run(main())
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert all(len(r.json()["data"]) == per_request for r in answers)
    assert probes[-6:] == [503] * 6, probes  # both replicas: none answers ready
    assert server.proc.wait(60) == 0
