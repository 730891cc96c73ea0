"""Readers for deploy/: Kubernetes manifests, kustomize output, the Dockerfile and .dockerignore.

Only parsing lives here; every check is in a test. Kubernetes schemas come from the
`kubernetes-validate` package (offline). Kustomize output needs `kubectl` or `kustomize` on PATH;
`render` returns None without either, and the tests that need it skip with the reason.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: Kubernetes versions every manifest must validate against: the oldest we support and the
#: newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30", "1.37")

#: kustomization folders, and the image flavour (Dockerfile stage) their workloads run.
KUSTOMIZATIONS = {
    "base": None,
    "serving": "gpu",
    "pretraining": None,
    "pretraining/prepare": "gpu",
    "pretraining/stage1": "gpu",
    "pretraining/stage2": "gpu",
    "pretraining/export": "gpu",
    "overlays/local": "cpu",
}


# --------------------------------------------------------------------------- manifests
def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    """Every resource file under deploy/k8s (kustomization files and overlay patches excluded)."""
    return sorted(p for p in K8S.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and not p.name.startswith("patch-"))


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render(kdir: str) -> list[dict[str, Any]] | None:
    """`kustomize build deploy/k8s/<kdir>` as documents, or None when no kustomize is installed."""
    cmd = kustomize_command()
    if cmd is None:
        return None
    out = subprocess.run([*cmd, str(K8S / kdir)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"kustomize build {kdir} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def raw_docs(kdir: str) -> list[dict[str, Any]]:
    """The resources a kustomization lists, read without kustomize (no transformers applied)."""
    kfile = yaml.safe_load((K8S / kdir / "kustomization.yaml").read_text())
    docs = []
    for res in kfile.get("resources", []):
        p = (K8S / kdir / res).resolve()
        docs += raw_docs(str(p.relative_to(K8S))) if p.is_dir() else load_docs(p)
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


@dataclass
class Workload:
    """One pod template of a workload (a PyTorchJob has one per replica type)."""

    doc: dict
    where: str
    pod: dict  # the pod template: {"metadata":..., "spec":...}

    @property
    def spec(self) -> dict:
        return self.pod["spec"]

    @property
    def labels(self) -> dict:
        return self.pod.get("metadata", {}).get("labels", {})


def workloads(docs: list[dict]) -> Iterator[Workload]:
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield Workload(d, name, d["spec"]["template"])
        elif d["kind"] == "PyTorchJob":
            for rtype, rspec in d["spec"]["pytorchReplicaSpecs"].items():
                yield Workload(d, f"{name}[{rtype}]", rspec["template"])


def container_env(container: dict, docs: list[dict],
                  secret_values: dict[str, str] | None = None) -> dict[str, str]:
    """The env a container sees from the manifests (ConfigMaps resolved; Secrets from `secret_values`
    keyed `secret/key`, else a placeholder)."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            cms = find(docs, "ConfigMap", src["configMapRef"]["name"])
            assert cms or src["configMapRef"].get("optional"), f"ConfigMap {src['configMapRef']} missing"
            for cm in cms:
                env.update({k: str(v) for k, v in cm.get("data", {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = (secret_values or {}).get(f"{ref['name']}/{ref['key']}", "secret")
    return env


def quantity_to_float(q: str | int | float) -> float:
    """Kubernetes quantity -> number (bytes for memory: Gi/Mi/G...; cores for cpu: m)."""
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9,
             "T": 1e12, "m": 1e-3}
    for u, f in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


# --------------------------------------------------------------------------- Dockerfile
@dataclass
class Instruction:
    cmd: str        # upper case: FROM, RUN, ...
    value: str      # the rest of the (joined) line
    lineno: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            for tok in shlex.split(ins.value):
                key, _, value = tok.partition("=")
                out[key] = value
        return out

    def json_args(self, cmd: str) -> list[str]:
        (ins,) = self.all(cmd)
        return json.loads(ins.value)


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def resolve(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.global_args.get(m.group(1), m.group(0)), text)


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    """Instructions per stage; continuation lines joined, comments dropped."""
    lines = path.read_text().splitlines()
    joined: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, line in enumerate(lines, 1):
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if not buf:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        joined.append((start, buf + line))
        buf = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for lineno, text in joined:
        cmd, _, value = text.strip().partition(" ")
        ins = Instruction(cmd.upper(), value.strip(), lineno)
        if ins.cmd == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", ins.value, re.IGNORECASE)
            assert m, f"line {lineno}: every stage must be named (FROM image AS name)"
            current = stages[m.group(2)] = Stage(m.group(2), m.group(1))
        elif current is None:
            assert ins.cmd == "ARG", f"line {lineno}: only ARG may precede the first FROM"
            key, _, default = ins.value.partition("=")
            global_args[key] = default
        else:
            current.instructions.append(ins)
    return Dockerfile(global_args, stages)


def run_flags_stripped(value: str) -> str:
    """A RUN instruction's command without BuildKit flags (--mount=..., --network=...)."""
    toks = shlex.split(value)
    while toks and toks[0].startswith("--"):
        toks.pop(0)
    return shlex.join(toks)


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """(options, exec-form CMD) of the stage's HEALTHCHECK."""
    (ins,) = stage.all("HEALTHCHECK")
    opts_text, _, cmd = ins.value.partition("CMD")
    opts = dict(tok.lstrip("-").split("=", 1) for tok in shlex.split(opts_text))
    return opts, json.loads(cmd)


def duration_s(text: str) -> float:
    """Docker duration (`30s`, `10m`, `1h`) in seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert m, f"duration must look like 30s/10m/1h, got {text!r}"
    return float(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# --------------------------------------------------------------------------- .dockerignore
def dockerignore_rules(path: Path = DOCKERIGNORE) -> list[tuple[bool, str]]:
    """(exclude?, pattern) in file order; `!pattern` re-includes."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        rules.append((not neg, pat.strip("/")))
    return rules


def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's pattern syntax: `*` and `?` stay inside one folder, `**` spans folders."""
    out = []
    for tok in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out.append({"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(tok, re.escape(tok)))
    return re.compile("".join(out) + r"\Z")


def _match(pattern: str, rel: str) -> bool:
    """A pattern matches a path when it matches the path itself or one of its parent folders."""
    regex = _pattern_regex(pattern)
    parts = rel.split("/")
    return any(regex.match("/".join(parts[: i + 1])) for i in range(len(parts)))


def is_excluded(rel: str, rules: list[tuple[bool, str]]) -> bool:
    excluded = False
    for exclude, pattern in rules:
        if _match(pattern, rel):
            excluded = exclude
    return excluded


def build_context(root: Path = ROOT, rules: list[tuple[bool, str]] | None = None) -> list[str]:
    """Relative paths of the files `docker build` would send (excluded folders are not walked
    unless a `!` rule could re-include something below them)."""
    rules = dockerignore_rules() if rules is None else rules
    has_negation = any(not ex for ex, _ in rules)
    out = []

    def walk(d: Path, rel: str) -> None:
        for p in sorted(d.iterdir()):
            r = f"{rel}/{p.name}" if rel else p.name
            if p.is_dir() and not p.is_symlink():
                if is_excluded(r, rules) and not has_negation:
                    continue
                walk(p, r)
            elif not is_excluded(r, rules):
                out.append(r)

    walk(root, "")
    return out
