"""deploy/k8s: valid Kubernetes objects, and consistent with the code they run.

Consistency is checked against the code itself, not against copies of its constants: server
settings are rebuilt with `serving.config.load_config` from the manifests' env and args, command
lines are parsed with the real `hdb` and `torchrun` parsers, pretraining settings are resolved with
`pretrain.config.load_config`, and the HPA's metric must be one `serving.metrics.Metrics` exports.
"""

from __future__ import annotations

import base64
import copy
import json
import tomllib
from pathlib import PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
from hdb_deploy_helpers import (
    K8S_VERSIONS,
    KUSTOMIZATIONS,
    ROOT,
    container_env,
    find,
    load_docs,
    manifest_files,
    parse_dockerfile,
    quantity_to_float,
    raw_docs,
    render,
    workloads,
)

SERVING_ENV_EXTRA = {"HDB_CONFIG", "HDB_CACHE_DIR"}  # read by load_config / hypernet.defaults
VALID_KEY = "tenant-a:" + "k" * 32  # what an operator puts in the hdb-api-keys Secret
DRAIN_MARGIN_S = 5  # SIGKILL must not land while the server's last stop() steps run


# --------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="module")
def hdb_parser():
    from hdb.cli import build_parser

    return build_parser()


@pytest.fixture(scope="module")
def torchrun_parser():
    from torch.distributed.run import get_args_parser

    return get_args_parser()


@pytest.fixture(scope="module")
def rendered():
    """Every kustomization, built (skips without kubectl/kustomize)."""
    out = {k: render(k) for k in KUSTOMIZATIONS}
    if any(v is None for v in out.values()):
        pytest.skip("kustomize output needs `kubectl` or `kustomize` on PATH (neither found)")
    return out


@pytest.fixture(params=["serving-raw", "serving", "local"])
def serving_docs(request):
    """The serving objects: the raw files (no kustomize needed), built, and the local overlay."""
    if request.param == "serving-raw":
        return request.param, "gpu", raw_docs("serving")
    docs = render("serving" if request.param == "serving" else "overlays/local")
    if docs is None:
        pytest.skip("kustomize output needs `kubectl` or `kustomize` on PATH (neither found)")
    return request.param, ("gpu" if request.param == "serving" else "cpu"), docs


# --------------------------------------------------------------------------- schemas
#: PyTorchJob is a CRD (kubeflow.org/v1, training-operator): its own fields are checked here,
#: each replica's pod template against the real Kubernetes PodTemplate schema.
PYTORCHJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string",
                                             "pattern": "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"}}},
        "spec": {
            "type": "object",
            "required": ["pytorchReplicaSpecs"],
            "additionalProperties": False,
            "properties": {
                "nprocPerNode": {"type": "string", "pattern": "^(auto|cpu|gpu|[1-9][0-9]*)$"},
                "runPolicy": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                        "backoffLimit": {"type": "integer", "minimum": 0},
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                        "suspend": {"type": "boolean"},
                        "schedulingPolicy": {"type": "object"},
                    },
                },
                "elasticPolicy": {"type": "object"},
                "pytorchReplicaSpecs": {
                    "type": "object", "minProperties": 1, "additionalProperties": False,
                    "properties": {
                        "Master": {"allOf": [{"$ref": "#/$defs/replica"},
                                             {"properties": {"replicas": {"const": 1}}}]},
                        "Worker": {"$ref": "#/$defs/replica"},
                    },
                },
            },
        },
    },
    "$defs": {
        "replica": {
            "type": "object", "required": ["template"], "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
                "template": {"type": "object", "required": ["spec"]},
            },
        },
    },
}


def validate(doc: dict, version: str) -> None:
    if doc["kind"] == "PyTorchJob":
        jsonschema.validate(doc, PYTORCHJOB_SCHEMA)
        for rtype, rspec in doc["spec"]["pytorchReplicaSpecs"].items():
            names = [c["name"] for c in rspec["template"]["spec"]["containers"]]
            assert "pytorch" in names, f"{rtype}: the operator needs a container named `pytorch`"
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                          "metadata": {"name": f"{rtype.lower()}"},
                                          "template": rspec["template"]}, version, strict=True)
        return
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_file_validates(version):
    files = manifest_files()
    assert len(files) >= 12
    for path in files:
        for doc in load_docs(path):
            try:
                validate(doc, version)
            except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
                raise AssertionError(f"{path.relative_to(ROOT)} ({doc['kind']}): {e}") from None


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_kustomization_builds_and_validates(rendered, version):
    for kdir, docs in rendered.items():
        ids = [(d["kind"], d["metadata"]["name"]) for d in docs]
        assert len(ids) == len(set(ids)), f"{kdir}: duplicate objects {ids}"
        for doc in docs:
            assert doc["kind"] == "Namespace" or doc["metadata"].get("namespace") == "hyperdreambooth", \
                f"{kdir}: {doc['kind']}/{doc['metadata']['name']} must be in namespace hyperdreambooth"
            validate(doc, version)


def test_pytorchjob_schema_rejects_what_the_operator_rejects():
    """The hand-written schema is not vacuous: the operator's own rules fail it."""
    (job,) = load_docs(ROOT / "deploy/k8s/pretraining/stage2/pytorchjob.yaml")
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, K8S_VERSIONS[0])
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Launcher"] = bad["spec"]["pytorchReplicaSpecs"]["Worker"]
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, K8S_VERSIONS[0])
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "x"
    with pytest.raises(AssertionError, match="pytorch"):
        validate(bad, K8S_VERSIONS[0])
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["cpu"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad, K8S_VERSIONS[0])


# --------------------------------------------------------------------------- serving
def _serving_container(docs):
    (dep,) = find(docs, "Deployment", "hdb-serving")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, c


def _secret_values(docs) -> dict[str, str]:
    """Secrets the manifests define (the local overlay's generated one); others get VALID_KEY."""
    out = {}
    for s in find(docs, "Secret"):
        for k, v in s.get("data", {}).items():
            out[f"{s['metadata']['name']}/{k}"] = base64.b64decode(v).decode()
        for k, v in s.get("stringData", {}).items():
            out[f"{s['metadata']['name']}/{k}"] = v
    for dep in find(docs, "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    out.setdefault(f"{ref['name']}/{ref['key']}", VALID_KEY)
    return out


def _serve_config(docs, flavour, hdb_parser):
    """The ServeConfig the pod's server builds: image ENV < manifest env < flags."""
    from serving.config import load_config

    _, c = _serving_container(docs)
    assert c["command"] == ["hdb"] and c["args"][0] == "serve"
    ns = hdb_parser.parse_args(c["args"])
    assert ns.command == "serve"
    image_env = parse_dockerfile().stages[flavour].env()
    environ = {**image_env, **container_env(c, docs, _secret_values(docs))}
    return load_config(ns, environ), environ


def test_serving_env_keys_are_serve_config_fields(serving_docs):
    from dataclasses import fields

    from serving.config import ENV_PREFIX, ServeConfig

    _, flavour, docs = serving_docs
    known = {ENV_PREFIX + f.name.upper() for f in fields(ServeConfig)} | SERVING_ENV_EXTRA
    _, c = _serving_container(docs)
    names = set(container_env(c, docs)) | set(parse_dockerfile().stages[flavour].env())
    unknown = {n for n in names if n.startswith(ENV_PREFIX)} - known
    assert not unknown, f"HDB_* variables no code reads (typo?): {sorted(unknown)}"
    assert {"HDB_API_KEYS", "HDB_STORE"} <= names


def test_cache_dir_variable_is_the_one_hypernet_reads(monkeypatch, tmp_path):
    from hypernet.defaults import cache_dir

    monkeypatch.setenv("HDB_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_serving_config_ports_probes_and_auth(serving_docs, hdb_parser):
    from serving.server import resolve_keyring
    from serving.stubs import SERVICE_NAME

    name, flavour, docs = serving_docs
    cfg, environ = _serve_config(docs, flavour, hdb_parser)
    dep, c = _serving_container(docs)
    pod = dep["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": cfg.port, "metrics": cfg.metrics_port}
    assert not cfg.binds_loopback_only(), "probes and Services reach the pod IP, not loopback"
    ring = resolve_keyring(cfg)
    assert ring is not None and len(ring) >= 1, "auth must be on outside a laptop"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": cfg.port, "service": SERVICE_NAME}, probe
    # The startup probe must outlast model loading; liveness must tolerate a long GPU batch.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= (300 if flavour == "gpu" else 60)
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == cfg.metrics_port
    assert ann["prometheus.io/path"] == "/metrics"
    # Dockerfile EXPOSE: the same ports.
    (expose,) = parse_dockerfile().stages[flavour].all("EXPOSE")
    assert {int(p) for p in expose.value.split()} == {cfg.port, cfg.metrics_port}


def test_serving_grace_period_covers_prestop_and_drain(serving_docs, hdb_parser):
    _, flavour, docs = serving_docs
    cfg, _ = _serve_config(docs, flavour, hdb_parser)
    dep, c = _serving_container(docs)
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    pre_stop = float(cmd[1])
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert cfg.grace_s >= 30, "in-flight personalisations need time to finish"
    assert grace >= pre_stop + cfg.grace_s + DRAIN_MARGIN_S, (
        f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + grace_s {cfg.grace_s} "
        f"+ {DRAIN_MARGIN_S}: SIGKILL would cut the drain short")


def test_serving_paths_are_on_mounted_volumes(serving_docs, hdb_parser):
    _, flavour, docs = serving_docs
    cfg, environ = _serve_config(docs, flavour, hdb_parser)
    dep, c = _serving_container(docs)
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]}
    (volume_decl,) = parse_dockerfile().stages[flavour].all("VOLUME")
    assert set(mounts) <= set(json.loads(volume_decl.value)), "mount the image's VOLUMEs"

    def mount_of(path: str) -> tuple[str, bool]:
        hits = [(m, ro) for m, ro in mounts.items() if PurePosixPath(path).is_relative_to(m)]
        assert hits, f"{path} is on no mounted volume (mounts: {sorted(mounts)})"
        return max(hits, key=lambda h: len(h[0]))

    for path in (cfg.base, cfg.hypernet):
        if path:
            mount_of(path)
    if "://" not in cfg.store or cfg.store.startswith("file://"):
        assert not mount_of(cfg.store.removeprefix("file://"))[1], "local store must be writable"
    assert not mount_of(environ["HDB_CACHE_DIR"])[1], "the cache must be writable"
    if flavour == "gpu":
        assert cfg.store.startswith("s3://"), "replicas share identities through S3"
        assert cfg.base and cfg.hypernet, "GPU pods serve real models, not the embedded tiny ones"
    else:
        assert not cfg.base and not cfg.hypernet, "the local overlay runs the embedded defaults"


def test_serving_resources_match_the_image_flavour(serving_docs):
    _, flavour, docs = serving_docs
    dep, c = _serving_container(docs)
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    gpus = int(lim.get("nvidia.com/gpu", 0))
    assert gpus == (1 if flavour == "gpu" else 0), "one model worker per GPU"
    assert int(req.get("nvidia.com/gpu", 0)) == gpus
    assert quantity_to_float(req["memory"]) <= quantity_to_float(lim["memory"])
    assert c["image"].split(":")[-1].endswith(f"-{flavour}") or ":" not in c["image"]
    sc = dep["spec"]["template"]["spec"]["securityContext"]
    (user,) = parse_dockerfile().stages[flavour].all("USER")
    assert sc["runAsNonRoot"] and str(sc["runAsUser"]) == user.value.split(":")[0] != "0"


def test_serving_services_pdb_and_hpa_select_the_pods(serving_docs):
    from serving.metrics import Metrics

    name, _, docs = serving_docs
    dep, c = _serving_container(docs)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in c["ports"]}
    services = find(docs, "Service")
    assert any(s["spec"].get("clusterIP") == "None" for s in services), \
        "a headless Service for client-side gRPC balancing"
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names
    if name == "local":
        assert not find(docs, "HorizontalPodAutoscaler") and not find(docs, "PersistentVolumeClaim")
        return
    (pdb,) = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (hpa,) = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1, \
        "a drain must leave one pod serving"
    exported = set(Metrics().registry._names_to_collectors)
    for m in hpa["spec"]["metrics"]:
        if m["type"] == "Pods":
            assert m["pods"]["metric"]["name"] in exported, "the HPA scales on a metric the server exports"


# --------------------------------------------------------------------------- pretraining
PRETRAIN_DIRS = ("pretraining/prepare", "pretraining/stage1", "pretraining/stage2", "pretraining/export")


def _pretrain_invocations(hdb_parser, torchrun_parser):
    """(workload, container, torchrun args or None, parsed pretrain args) of every step."""
    out = []
    for kdir in PRETRAIN_DIRS:
        for w in workloads(raw_docs(kdir)):
            for c in w.spec["containers"]:
                cmd = [*c.get("command", []), *c.get("args", [])]
                if cmd[0] == "torchrun":
                    tr = torchrun_parser.parse_args(cmd[1:])
                    assert tr.module and tr.training_script == "pretrain", f"{w.where}: torchrun -m pretrain"
                    rest = tr.training_script_args
                else:
                    assert cmd[:3] == ["python", "-m", "pretrain"], f"{w.where}: {cmd}"
                    tr, rest = None, cmd[3:]
                ns = hdb_parser.parse_args(["pretrain", *rest])
                out.append((kdir, w, c, tr, ns))
    return out


def test_pretraining_commands_parse_and_share_one_run(hdb_parser, torchrun_parser):
    from pretrain.cli import collect_overrides
    from pretrain.config import load_config

    runs = _pretrain_invocations(hdb_parser, torchrun_parser)
    assert [ns.stage for *_, ns in runs] == ["prepare", "stage1", "stage2", "stage2", "export"]
    keys = set()
    for _kdir, w, c, tr, ns in runs:
        cfg = load_config(ns.config, collect_overrides(ns))
        # Same run folder and same settings, or a later step would not find (or would redo)
        # what an earlier one wrote: pretrain keys its outputs by these sections.
        keys.add((str(ns.output_dir), cfg.section_key("data", "stage1", "stage2", "export")))
        mounts = {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]}
        assert any(ns.output_dir.is_relative_to(m) and not ro for m, ro in mounts.items()), \
            f"{w.where}: --output-dir must be on a writable volume"
        assert cfg.base and any(PurePosixPath(cfg.base).is_relative_to(m) for m in mounts), w.where
        if ns.stage == "prepare":
            for corpus in cfg.data.corpus:
                assert any(PurePosixPath(corpus).is_relative_to(m) for m in mounts), w.where
        claims = {v["persistentVolumeClaim"]["claimName"] for v in w.spec["volumes"]
                  if "persistentVolumeClaim" in v}
        declared = {d["metadata"]["name"] for d in raw_docs("pretraining")
                    if d["kind"] == "PersistentVolumeClaim"}
        assert claims <= declared, f"{w.where}: claims {claims - declared} are not declared"
        gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        if tr is not None:
            assert int(tr.nproc_per_node) == gpus, f"{w.where}: one rank per GPU"
    assert len(keys) == 1, f"steps disagree on the run: {keys}"


def test_stage1_indexed_job_rendezvous_is_consistent(hdb_parser, torchrun_parser):
    docs = raw_docs("pretraining/stage1")
    (job,) = find(docs, "Job")
    (svc,) = find(docs, "Service")
    spec, pod = job["spec"], job["spec"]["template"]
    assert spec["completionMode"] == "Indexed"
    (c,) = pod["spec"]["containers"]
    tr = next(tr for kdir, w, _, tr, _ in _pretrain_invocations(hdb_parser, torchrun_parser)
              if kdir == "pretraining/stage1")
    assert int(tr.nnodes) == spec["completions"] == spec["parallelism"]
    assert tr.rdzv_backend == "c10d" and int(tr.max_restarts) >= 1
    host, port = tr.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{pod['spec']['subdomain']}", \
        "indexed pods are named <job>-<index>; pod 0 hosts the rendezvous"
    assert svc["metadata"]["name"] == pod["spec"]["subdomain"] and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in c["ports"]}


def test_stage2_pytorchjob_matches_torchrun(hdb_parser, torchrun_parser):
    (job,) = find(raw_docs("pretraining/stage2"), "PyTorchJob")
    nproc = job["spec"]["nprocPerNode"]
    runs = [r for r in _pretrain_invocations(hdb_parser, torchrun_parser) if r[0] == "pretraining/stage2"]
    assert len(runs) == len(job["spec"]["pytorchReplicaSpecs"]) == 2
    for _, w, c, tr, _ns in runs:
        assert tr.nproc_per_node == nproc
        # The operator's PET_* variables set these; a hard-coded value would fight them.
        given = {a.split("=")[0].replace("_", "-") for a in c["args"] if a.startswith("--")}
        assert not given & {"--nnodes", "--node-rank", "--master-addr", "--master-port",
                            "--rdzv-endpoint"}, w.where
        assert c["name"] == "pytorch"
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in w.spec["volumes"]), \
            "NCCL/dataloaders need a /dev/shm bigger than the 64 MiB default"


# --------------------------------------------------------------------------- images
def test_images_are_one_name_with_a_dockerfile_flavour(rendered):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    stages = set(parse_dockerfile().stages)
    names = set()
    for kdir, docs in rendered.items():
        flavour = KUSTOMIZATIONS[kdir]
        for w in workloads(docs):
            for c in w.spec["containers"] + w.spec.get("initContainers", []):
                name, tag = c["image"].rsplit(":", 1)
                names.add(name if kdir != "overlays/local" else "local")
                assert tag == f"{version}-{flavour}", f"{kdir} {w.where}: tag {tag}"
                assert flavour in stages
                gpus = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                assert (gpus > 0) == (flavour == "gpu"), f"{w.where}: GPU pods run the gpu image"
    assert len(names - {"local"}) == 1, f"one registry path for every workload, got {names}"
    # The raw files all use the placeholder the kustomizations rewrite.
    for path in manifest_files():
        for w in workloads(load_docs(path)):
            assert {c["image"] for c in w.spec["containers"]} == {"hyperdreambooth"}, path
