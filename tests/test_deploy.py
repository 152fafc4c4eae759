"""deploy/: the Kubernetes manifests are valid for the Kubernetes API (offline, with the schemas kubernetes-validate
ships) and agree with the server: the container's flags parse with ``yolostream serve``'s own parser, and ports,
probes, grace periods and scrape annotations match the values those flags (or SETTINGS' defaults) give."""

from __future__ import annotations

import argparse
import copy
import re

import pytest
import yaml

from conftest import REPO
from yolostream.server.serve.command import register_serve, resolve_settings

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")

MANIFEST = REPO / "deploy" / "k8s" / "yolostream.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
#: The oldest Kubernetes the manifests are meant for (native gRPC probes are GA since 1.27) and the newest schema.
VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


def _documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}


def _serve_values(args: list[str]) -> dict:
    """The settings ``yolostream serve ARGS`` would run with (flags over SETTINGS' defaults; no config file)."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    register_serve(parser)
    return resolve_settings(parser.parse_args(args), environ={})


def _container(docs: dict[str, dict]) -> dict:
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("version", VERSIONS)
def test_the_manifests_are_valid_kubernetes_objects(version):
    assert kubernetes_validate.utils.all_versions(), "kubernetes-validate ships no schemas"
    docs = _documents()
    assert set(docs) == {"Deployment", "Service", "PodDisruptionBudget"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, version, strict=True)
    broken = copy.deepcopy(docs["Deployment"])
    _container({"Deployment": broken})["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_ports_probes_and_grace_periods_agree_with_the_server_flags():
    docs = _documents()
    pod = docs["Deployment"]["spec"]["template"]
    container = _container(docs)
    values = _serve_values(container["args"])
    assert values["host"] == "0.0.0.0", "the server must listen on the pod's address, not loopback"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == values["port"]
    assert values["metrics_port"] is not None and ports["metrics"] == values["metrics_port"]

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == values["metrics_port"]
    assert annotations["prometheus.io/path"] == "/metrics"

    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[name]
        assert probe["grpc"]["port"] == values["port"], name
        assert probe.get("grpc", {}).get("service", "") == "", f"{name}: the server reports health on ''"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "model load + warm-up needs time"
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 10, "a draining pod must leave quickly"

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = float(pre_stop[1])
    # SIGTERM comes after preStop; the server then reports NOT_SERVING for --drain-delay
    # before it stops taking frames, and answers what it accepted within --grace.
    stopping_s = sleep_s + (values.get("drain_delay") or 0) + values["grace"]
    grace_period = pod["spec"]["terminationGracePeriodSeconds"]
    assert stopping_s <= grace_period <= stopping_s + 15, (sleep_s, values.get("drain_delay"), values["grace"],
                                                           grace_period)

    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert values["device"] == "cuda"

    # Front-ends map --shm-mb of /dev/shm each; the container default (64 MiB) is too small, so a memory volume.
    assert values["frontends"] is not None, "give --frontends: its CUDA default depends on the node's cores"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert _mebibytes(volume["emptyDir"]["sizeLimit"]) >= values["shm_mb"] * values["frontends"]


def _mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (``640Mi``, ``1Gi``, ``500M``) in MiB."""
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 ** 2, "k": 1e3 / 2 ** 20, "M": 1e6 / 2 ** 20,
             "G": 1e9 / 2 ** 20}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMG])?", quantity)
    assert match, f"not a memory quantity: {quantity}"
    return float(match.group(1)) * (units[match.group(2)] if match.group(2) else 1 / 2 ** 20)


def test_the_service_is_headless_and_the_selectors_match_the_pods():
    docs = _documents()
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service, budget = docs["Service"]["spec"], docs["PodDisruptionBudget"]["spec"]
    assert service["clusterIP"] == "None", "clients balance over the pods themselves: the Service must be headless"
    assert not service.get("publishNotReadyAddresses", False)
    for selector in (service["selector"], budget["selector"]["matchLabels"],
                     docs["Deployment"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    ports = {p["name"]: p for p in _container(docs)["ports"]}
    for port in service["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]["containerPort"]
    assert budget["maxUnavailable"] < docs["Deployment"]["spec"]["replicas"]


def test_the_image_runs_the_server_on_the_ports_the_manifests_expect():
    text = DOCKERFILE.read_text()
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert re.search(r"^ENTRYPOINT \[\"yolostream\", \"serve\"\]$", text, re.M)
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M).group(1)
    values = _serve_values(yaml.safe_load(cmd))
    manifest = _serve_values(_container(_documents())["args"])
    assert values["host"] == "0.0.0.0" and {values["port"], values["metrics_port"]} <= exposed
    assert (values["port"], values["metrics_port"]) == (manifest["port"], manifest["metrics_port"])
    assert re.search(r"pip install .*'\.\[server\]'", text), "the image installs the server extra"
