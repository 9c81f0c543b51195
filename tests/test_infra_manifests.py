"""The deployment files agree with each other and with the code, checked without Docker or a cluster.

No Docker engine and no Kubernetes cluster exist on the development machines, so
`infra/compose.yaml`, `infra/k8s/*.yaml`, `prefect.yaml`, `infra/prefect-k8s.yaml` and
`infra/docker/Dockerfile.worker` are parsed and modelled here: each runnable container becomes a
`Container` (effective argv, environment, ports, mounts, GPU), each system (compose, k8s) a
`System` of containers plus the DNS names (services) they can reach. The checkers return lists of
problems, so a mutated copy of a file can show that each rule really fails (the last tests).

What "agree" means, rule by rule:
- every URL in an environment variable names a service of the same system, on a port that
  service declares, and the container behind it really listens there (its command's flags);
- every variable the code reads is set where that code runs (names grepped from the source:
  the model cache variable, the S3 credentials and endpoint, the pull step's variable), and
  every PREFECT_* variable is a setting Prefect 3.8.8 knows (a typo is silently ignored);
- one image (pulse-worker, the project's version) for every Python process, in both systems;
- work pools, entrypoints and schedules match prefect.yaml;
- each Dask GPU worker has one GPU, `--nthreads 1` and the resource the flow asks for, and every
  process that loads a model has the shared model cache mounted at PULSE_CACHE.
"""

from __future__ import annotations

import ast
import copy
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
INFRA = REPO_ROOT / "infra"
COMPOSE_FILE = INFRA / "compose.yaml"
K8S_DIR = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile.worker"
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
PREFECT_K8S_YAML = INFRA / "prefect-k8s.yaml"

PULSE_IMAGE = "pulse-worker"  # the image built from Dockerfile.worker (name without registry)
IMAGE_DEFAULT_PORTS = {"postgres": {5432}}  # images whose port is their default, not a flag
BROWSER_HOSTS = {"localhost", "127.0.0.1"}  # URLs for a browser (PREFECT_UI_API_URL), not a pod
URL = re.compile(
    r"\b(?P<scheme>[a-z][a-z0-9+]*)://(?:[^@/\s]*@)?(?P<host>[A-Za-z0-9.-]+):(?P<port>\d+)"
)


# --------------------------------------------------------------------------------------------
# What the code and the other files say (grepped or parsed, never imported: torch is slow)


@dataclass(frozen=True)
class CodeFacts:
    """Names and values the running code depends on, read from the source."""

    cache_env: str  # the model cache variable (pulse_core/generators/cache.py ENV_VAR)
    credential_envs: tuple[str, ...]  # S3 keys the storage layer tells users to set
    endpoint_envs: tuple[str, ...]  # S3 endpoint variables the storage layer reads
    gpu_resource: tuple[str, int]  # what restore tasks ask of a Dask worker
    pull_envs: tuple[str, ...]  # variables prefect.yaml's pull steps template
    version: str  # the project's version: the image tag
    torch_pin: str  # the Makefile's torch pin
    weed_fixed_flags: tuple[str, ...]  # flags infra/processes.py always gives `weed mini`
    local_ports: dict[str, int]  # infra/local_stack.py DEFAULT_PORTS
    local_pool: str  # infra/local_stack.py WORK_POOL


def _module_constant(path: Path, name: str) -> Any:
    """A literal module-level constant of a Python file, without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in {path}")


def template_envs(value: Any) -> set[str]:
    """The `{{ $NAME }}` environment references inside a prefect.yaml value."""
    return set(re.findall(r"\{\{\s*\$(\w+)\s*\}\}", json.dumps(value)))


def code_facts() -> CodeFacts:
    storage = (REPO_ROOT / "pulse_core" / "storage.py").read_text()
    flow = (REPO_ROOT / "flows" / "restore.py").read_text()
    processes = (INFRA / "processes.py").read_text()
    weed_body = processes[processes.index("def weed_mini_command") :]
    weed_body = weed_body[: weed_body.index("\ndef ")]
    gpu = re.search(r'"resources":\s*\{"(\w+)":\s*(\d+)\}', flow)
    assert gpu, "flows/restore.py no longer annotates tasks with a resource"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r"^TORCH\s*:=\s*torch==(\S+)", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert torch_pin
    return CodeFacts(
        cache_env=_module_constant(REPO_ROOT / "pulse_core" / "generators" / "cache.py", "ENV_VAR"),
        credential_envs=tuple(
            n for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if n in storage
        ),
        endpoint_envs=tuple(re.findall(r'os\.environ\.get\("(AWS_ENDPOINT_URL\w*)"\)', storage)),
        gpu_resource=(gpu.group(1), int(gpu.group(2))),
        pull_envs=tuple(sorted(template_envs(yaml.safe_load(PREFECT_YAML.read_text())["pull"]))),
        version=re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.M).group(1),  # type: ignore[union-attr]
        torch_pin=torch_pin.group(1),
        weed_fixed_flags=tuple(re.findall(r'"(-[\w.]+)=[^{"]*"', weed_body)),
        local_ports=_module_constant(INFRA / "local_stack.py", "DEFAULT_PORTS"),
        local_pool=_module_constant(INFRA / "local_stack.py", "WORK_POOL"),
    )


@dataclass
class Dockerfile:
    env: dict[str, str]
    args: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    workdirs: list[str]
    copies: list[tuple[str, str]]  # (source, absolute destination folder)
    runs: list[str]

    def project_root(self) -> str | None:
        """The folder that holds `flows/` in the image (where flow runs must start)."""
        for source, folder in self.copies:
            if source.rstrip("/") == "flows":
                return posixpath.dirname(posixpath.normpath(folder))
        return None


def parse_dockerfile(text: str) -> Dockerfile:
    """The instructions this test needs (ENV, ARG, ENTRYPOINT, CMD, WORKDIR, COPY, RUN)."""
    joined = re.sub(r"\\\n", " ", text)
    out = Dockerfile({}, {}, [], [], [], [], [])
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ENV":
            out.env.update(dict(part.split("=", 1) for part in shlex.split(rest)))
        elif word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            out.args[name] = shlex.split(value)[0] if value.strip() else ""
        elif word in ("ENTRYPOINT", "CMD"):
            setattr(out, word.lower(), json.loads(rest))
        elif word == "WORKDIR":
            out.workdirs.append(rest.strip())
        elif word == "COPY":
            *sources, dest = rest.split()
            folder = dest if dest.startswith("/") else f"{out.workdirs[-1]}/{dest}"
            out.copies += [(s, folder) for s in sources]
        elif word == "RUN":
            out.runs.append(rest)
    return out


# --------------------------------------------------------------------------------------------
# The model: containers and systems


@dataclass
class Container:
    """One process as a container runs it: where it comes from and what it is given."""

    where: str  # "compose service dask-gpu-worker" / "k8s Deployment/dask-gpu-worker"
    image: str
    argv: list[str]  # the effective command line (entrypoint + command), `tini --` removed
    env: dict[str, str]  # effective environment (image ENV, then the file's); secrets as <...>
    ports: set[int]  # container ports declared for it
    mounts: dict[str, str]  # mount path -> volume identity ("volume:model-cache", "pvc:...")
    gpus: int  # GPUs reserved (compose) or limited (k8s)

    @property
    def pulse_image(self) -> bool:
        return image_name(self.image) == PULSE_IMAGE

    def commands(self) -> list[list[str]]:
        """The program invocations it runs: argv itself, or each line of an `sh -c` script."""
        if self.argv[:2] != ["sh", "-c"]:
            return [self.argv]
        script = self.argv[2].replace("\\\n", " ")
        found = []
        for line in re.split(r"\n|&&|\|\|", script):
            words = shlex.split(line)
            if words and words[0] == "exec":
                words = words[1:]
            # Shell plumbing is not a program: `set -e`, `name=value` assignments.
            if words and words[0] != "set" and not re.match(r"^\w+=", words[0]):
                found.append(words)
        return found

    def runs(self, *prefix: str) -> list[str] | None:
        """The first command that starts with `prefix` (e.g. "dask", "worker"), if any."""
        return next((c for c in self.commands() if c[: len(prefix)] == list(prefix)), None)

    def role(self) -> str:
        for prefix in (
            ("prefect", "server", "start"),
            ("prefect", "worker", "start"),
            ("prefect", "flow-run", "execute"),
            ("dask", "scheduler"),
            ("dask", "worker"),
        ):
            if self.runs(*prefix):
                return "-".join(prefix[:2])
        return image_name(self.image)

    def listening_ports(self) -> set[int]:
        """Ports its command (or its image, by default) listens on."""
        ports = set(IMAGE_DEFAULT_PORTS.get(image_name(self.image), set()))
        for command in self.commands():
            for flag in ("--port", "--dashboard-address"):
                if flag in command:
                    ports.add(int(command[command.index(flag) + 1].rsplit(":", 1)[-1]))
            ports |= {int(m) for w in command for m in re.findall(r"^-s3\.port=(\d+)$", w)}
        return ports


@dataclass
class System:
    """Containers and the names they reach each other by (name -> ports answered there)."""

    name: str
    containers: list[Container]
    services: dict[str, set[int]]
    browser_ports: set[int] = field(default_factory=set)  # reachable from an operator's browser
    project_root: str | None = None  # where the pulse image holds flows/ (Dockerfile COPY)
    problems: list[str] = field(default_factory=list)  # found while building it


def image_name(image: str) -> str:
    """`registry.example.com/pulse-worker:0.1.0` -> `pulse-worker`."""
    return image.rsplit("/", 1)[-1].split(":", 1)[0]


def image_tag(image: str) -> str:
    return image.rsplit("/", 1)[-1].partition(":")[2]


def effective_env(image: str, own: dict[str, str], dockerfile: Dockerfile) -> dict[str, str]:
    """What the process sees: the pulse image's ENV under the container's own variables."""
    return {**(dockerfile.env if image_name(image) == PULSE_IMAGE else {}), **own}


def strip_tini(argv: list[str]) -> list[str]:
    return argv[2:] if argv[:2] == ["tini", "--"] else argv


# --------------------------------------------------------------------------------------------
# compose.yaml -> System


def interpolate(value: Any) -> str:
    """Compose's `${NAME:-default}` -> default; `${NAME}` / `${NAME:?msg}` -> `<NAME>`."""

    def sub(m: re.Match[str]) -> str:
        name, op, rest = m.group(1), m.group(2) or "", m.group(3) or ""
        return rest if op in (":-", "-") else f"<{name}>"

    return re.sub(r"\$\{(\w+)(:-|-|:\?|\?)?([^}]*)\}", sub, str(value))


def _compose_ports(spec: dict[str, Any]) -> tuple[set[int], set[int]]:
    """(container ports, host ports) of a compose service's `ports` and `expose`."""
    inside, host = set(), set()
    for entry in spec.get("ports", []):
        parts = str(entry).split(":")
        inside.add(int(parts[-1].split("/")[0]))
        if len(parts) >= 2:
            host.add(int(parts[-2]))
    inside |= {int(str(p).split("/")[0]) for p in spec.get("expose", [])}
    return inside, host


def compose_system(doc: dict[str, Any], dockerfile: Dockerfile) -> System:
    system = System("compose", [], {}, project_root=dockerfile.project_root())
    volumes = set(doc.get("volumes") or {})
    for name, spec in doc["services"].items():
        image = interpolate(spec.get("image", ""))
        if not image and "build" in spec:
            image = f"{PULSE_IMAGE}:<build>"
        if "build" in spec:
            built = (COMPOSE_FILE.parent / spec["build"]["context"]).resolve()
            if (built / spec["build"]["dockerfile"]).resolve() != DOCKERFILE.resolve():
                system.problems.append(f"compose service {name} builds another Dockerfile")
        if image_name(image) == PULSE_IMAGE:
            entrypoint = spec.get("entrypoint", dockerfile.entrypoint)
            command = spec.get("command", dockerfile.cmd if "entrypoint" not in spec else [])
        else:
            entrypoint, command = spec.get("entrypoint", []), spec.get("command", [])
        if isinstance(command, str):
            command = shlex.split(command)
        environment = spec.get("environment") or {}
        if isinstance(environment, list):  # the `- NAME=value` form
            environment = dict(str(e).partition("=")[::2] for e in environment)
        env = {k: interpolate(v) for k, v in environment.items()}
        mounts = {}
        for mount in spec.get("volumes", []):
            source, target = str(mount).split(":")[:2]
            kind = "volume" if source in volumes else "bind"
            mounts[target] = f"{kind}:{source}"
        gpus = sum(
            # count: "all" takes every GPU of the host: never one.
            (99 if d.get("count") == "all" else int(d.get("count", len(d.get("device_ids", [])))))
            for d in spec.get("deploy", {})
            .get("resources", {})
            .get("reservations", {})
            .get("devices", [])
            if d.get("driver") == "nvidia" or "gpu" in d.get("capabilities", [])
        )
        inside, host = _compose_ports(spec)
        system.services[name] = inside
        system.browser_ports |= host
        system.containers.append(
            Container(
                f"compose service {name}",
                image,
                strip_tini([str(w) for w in [*entrypoint, *command]]),
                effective_env(image, env, dockerfile),
                inside,
                mounts,
                gpus,
            )
        )
    return system


# --------------------------------------------------------------------------------------------
# infra/k8s/*.yaml -> System


def k8s_documents(directory: Path = K8S_DIR) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def documented_secret_keys(directory: Path = K8S_DIR) -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic` lines the files document.

    The manifests hold no secret values; the commands in their headers are the contract an
    operator follows, so they must provide every key a pod takes from the Secret.
    """
    keys: dict[str, set[str]] = {}
    for path in sorted(directory.glob("*.yaml")):
        text = re.sub(r"\\\n#?\s*", " ", path.read_text())
        for m in re.finditer(r"create secret generic ([\w-]+)([^\n]*)", text):
            keys.setdefault(m.group(1), set()).update(
                re.findall(r"--from-literal=(\w+)=", m.group(2))
            )
    return keys


def _k8s_env(
    container: dict[str, Any],
    config_maps: dict[str, dict[str, str]],
    secrets: dict[str, set[str]],
    where: str,
    problems: list[str],
) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            if name not in config_maps:
                problems.append(f"{where}: envFrom ConfigMap {name!r} is not defined")
            env.update(config_maps.get(name, {}))
        if "secretRef" in source:
            name = source["secretRef"]["name"]
            if name not in secrets:
                problems.append(f"{where}: envFrom Secret {name!r} has no documented keys")
            env.update({k: f"<secret {name}/{k}>" for k in secrets.get(name, set())})
    for entry in container.get("env", []):
        if "value" in entry:
            value = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"]
            )
            env[entry["name"]] = str(value)
            continue
        ref = entry.get("valueFrom", {})
        if "secretKeyRef" in ref:
            secret, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
            if key not in secrets.get(secret, set()):
                problems.append(f"{where}: Secret {secret}/{key} is not in its documented keys")
            env[entry["name"]] = f"<secret {secret}/{key}>"
        elif "configMapKeyRef" in ref:
            cm, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
            if key not in config_maps.get(cm, {}):
                problems.append(f"{where}: ConfigMap {cm}/{key} is not defined")
            env[entry["name"]] = config_maps.get(cm, {}).get(key, "")
        else:
            env[entry["name"]] = "<field>"
    return env


def job_template_container(
    config_map: dict[str, Any],
    config_maps: dict[str, dict[str, str]],
    secrets: dict[str, set[str]],
    dockerfile: Dockerfile,
    problems: list[str],
) -> Container:
    """A flow-run Job of the kubernetes pool, as its base job template (in a ConfigMap) makes it.

    The worker fills `{{ command }}` with `prefect flow-run execute` and `{{ image }}` with the
    variable's default; the rest of the container (envFrom) is taken as written.
    """
    template = json.loads(config_map["data"]["base-job-template.json"])
    (job,) = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    where = f"k8s Job template in ConfigMap/{config_map['metadata']['name']}"
    if job.get("args") != "{{ command }}" or "command" in job:
        problems.append(f"{where}: the container must take the flow-run command as its args")
    image = template["variables"]["properties"]["image"]["default"] or ""
    env = _k8s_env({"envFrom": job.get("envFrom", [])}, config_maps, secrets, where, problems)
    argv = [*dockerfile.entrypoint, "prefect", "flow-run", "execute"]
    return Container(
        where, image, strip_tini(argv), effective_env(image, env, dockerfile), set(), {}, 0
    )


def k8s_system(
    docs: list[dict[str, Any]], dockerfile: Dockerfile, secrets: dict[str, set[str]]
) -> System:
    system = System("k8s", [], {}, project_root=dockerfile.project_root())
    config_maps = {
        d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
    }
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    pods: list[tuple[dict[str, str], list[Container]]] = []
    for w in workloads:
        where = f"k8s {w['kind']}/{w['metadata']['name']}"
        template = w["spec"]["template"]
        labels = template["metadata"]["labels"]
        if w["spec"]["selector"]["matchLabels"].items() - labels.items():
            system.problems.append(f"{where}: selector does not match its pod labels")
        spec = template["spec"]
        volumes = {}
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                if claim not in claims:
                    system.problems.append(f"{where}: PersistentVolumeClaim {claim!r} not defined")
                volumes[v["name"]] = f"pvc:{claim}"
            elif "configMap" in v:
                if v["configMap"]["name"] not in config_maps:
                    system.problems.append(
                        f"{where}: ConfigMap {v['configMap']['name']!r} not defined"
                    )
                volumes[v["name"]] = f"configmap:{v['configMap']['name']}"
            else:
                volumes[v["name"]] = f"other:{v['name']}"
        volumes |= {
            t["metadata"]["name"]: f"pvc-template:{t['metadata']['name']}"
            for t in w["spec"].get("volumeClaimTemplates", [])
        }
        containers = []
        for c in spec["containers"]:
            image = c["image"]
            if image_name(image) == PULSE_IMAGE:
                argv = c.get("command", dockerfile.entrypoint) + c.get(
                    "args", [] if "command" in c else dockerfile.cmd
                )
            else:
                argv = c.get("command", []) + c.get("args", [])
            mounts = {}
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    system.problems.append(f"{where}: volume {m['name']!r} is not defined")
                mounts[m["mountPath"]] = volumes.get(m["name"], "?")
            limits = c.get("resources", {}).get("limits", {})
            containers.append(
                Container(
                    where,
                    image,
                    strip_tini([str(a) for a in argv]),
                    effective_env(
                        image, _k8s_env(c, config_maps, secrets, where, system.problems), dockerfile
                    ),
                    {p["containerPort"] for p in c.get("ports", [])},
                    mounts,
                    int(limits.get("nvidia.com/gpu", 0)),
                )
            )
        pods.append((labels, containers))
        system.containers += containers
    for cm in docs:
        if cm["kind"] == "ConfigMap" and "base-job-template.json" in cm.get("data", {}):
            system.containers.append(
                job_template_container(cm, config_maps, secrets, dockerfile, system.problems)
            )
    for svc in (d for d in docs if d["kind"] == "Service"):
        name, selector = svc["metadata"]["name"], svc["spec"]["selector"]
        selected = [cs for labels, cs in pods if selector.items() <= labels.items()]
        if len(selected) != 1:
            system.problems.append(f"k8s Service/{name} selects {len(selected)} workloads, not 1")
        ports = set()
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            if p["port"] != target:
                system.problems.append(f"k8s Service/{name}: port {p['port']} != target {target}")
            if selected and not any(target in c.ports for c in selected[0]):
                system.problems.append(f"k8s Service/{name}: no container declares port {target}")
            ports.add(p["port"])
        system.services[name] = ports
        system.browser_ports |= ports  # `kubectl port-forward svc/NAME P:P`
    return system


# --------------------------------------------------------------------------------------------
# The rules


def check_system(system: System, facts: CodeFacts) -> list[str]:
    """Everything one system must satisfy on its own; [] when it is consistent."""
    problems = list(system.problems)
    roles: dict[str, list[Container]] = {}
    for c in system.containers:
        roles.setdefault(c.role(), []).append(c)
    for needed in ("prefect-server", "dask-scheduler", "dask-worker", "prefect-worker", "postgres"):
        if needed not in roles:
            problems.append(f"{system.name}: no {needed} container")

    for c in system.containers:
        listening = c.listening_ports()
        if c.ports != listening:
            problems.append(
                f"{c.where}: declares ports {sorted(c.ports)}, listens on {sorted(listening)}"
            )
        # Every URL names a service of this system, on a port it answers on.
        for name, value in c.env.items():
            for m in URL.finditer(value):
                host, port = m.group("host"), int(m.group("port"))
                if host in BROWSER_HOSTS:
                    if port not in system.browser_ports:
                        problems.append(
                            f"{c.where}: {name} port {port} is not reachable from a browser"
                        )
                elif host not in system.services:
                    problems.append(f"{c.where}: {name} names {host!r}, which is not a service")
                elif port not in system.services[host]:
                    problems.append(
                        f"{c.where}: {name} uses {host}:{port}, service ports {sorted(system.services[host])}"
                    )
        if c.pulse_image and image_tag(c.image) not in (facts.version, "<build>"):
            problems.append(
                f"{c.where}: image tag {image_tag(c.image)!r} != project {facts.version}"
            )

    python_roles = ("prefect-server", "prefect-worker", "dask-scheduler", "dask-worker")
    for role in python_roles:
        for c in roles.get(role, []):
            if not c.pulse_image:
                problems.append(
                    f"{c.where}: {role} must run the {PULSE_IMAGE} image, not {c.image}"
                )

    for c in roles.get("prefect-server", []):
        db = c.env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL", "")
        if not db.startswith("postgresql+asyncpg://"):
            problems.append(f"{c.where}: PREFECT_SERVER_DATABASE_CONNECTION_URL is not Postgres")
        port = next(iter(c.listening_ports()), None)
        if c.env.get("PREFECT_UI_API_URL", "").rsplit(":", 1)[-1] != f"{port}/api":
            problems.append(f"{c.where}: PREFECT_UI_API_URL must be <browser URL>:{port}/api")
    for pg in roles.get("postgres", []):
        for c in roles.get("prefect-server", []):
            url = c.env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL", "")
            m = re.match(r"[^:]+://([^:]+):[^@]*@[^/]+/(\w+)", url)
            if not m or (m.group(1), m.group(2)) != (
                pg.env.get("POSTGRES_USER"),
                pg.env.get("POSTGRES_DB"),
            ):
                problems.append(f"{c.where}: database user/name differ from {pg.where}'s")

    # Who needs what: every Prefect client the API URL; whatever reads or writes images the S3
    # credentials (and the endpoint when the system runs its own S3); whatever may load a model
    # the shared cache. A process worker runs flows in its own container (threads or a
    # LocalCluster load the model there); a kubernetes worker only creates Jobs, whose flow runs
    # send the batches to the Dask workers.
    s3_services = [c for c in system.containers if image_name(c.image) == "seaweedfs"]
    cache_mounts = set()
    for c in system.containers:
        role = c.role()
        pool_type = _flag(c.runs("prefect", "worker", "start") or [], "--type")
        runs_flows = role == "prefect-flow-run" or pool_type == "process"
        loads_model = role == "dask-worker" or pool_type == "process"
        clients = ("dask-worker", "prefect-worker", "prefect-flow-run")
        if role in clients and "PREFECT_API_URL" not in c.env:
            problems.append(f"{c.where}: PREFECT_API_URL is not set (an external cluster needs it)")
        if runs_flows or loads_model:
            for key in facts.credential_envs:
                if key not in c.env:
                    problems.append(f"{c.where}: {key} is not set")
            if s3_services and not any(c.env.get(k) for k in facts.endpoint_envs):
                problems.append(f"{c.where}: none of {facts.endpoint_envs} names the S3 service")
        if runs_flows:
            # The pull step's set_working_directory must land where flows/ is in the image.
            for name in facts.pull_envs:
                if c.env.get(name) != system.project_root:
                    problems.append(
                        f"{c.where}: {name}={c.env.get(name)} (prefect.yaml pull step) is not "
                        f"the image's project folder {system.project_root}"
                    )
        if loads_model:
            cache = c.env.get(facts.cache_env)
            if not cache:
                problems.append(f"{c.where}: {facts.cache_env} is not set")
            elif cache not in c.mounts:
                problems.append(f"{c.where}: no volume mounted at {facts.cache_env}={cache}")
            else:
                cache_mounts.add(c.mounts[cache])
    if len(cache_mounts) > 1:
        problems.append(
            f"{system.name}: model-loading services mount different caches {sorted(cache_mounts)}"
        )

    resource = f"{facts.gpu_resource[0]}={facts.gpu_resource[1]}"
    for c in roles.get("dask-worker", []):
        command = c.runs("dask", "worker") or []
        if "DASK_SCHEDULER_ADDRESS" not in c.env and not any(
            w.startswith("tcp://") for w in command
        ):
            problems.append(f"{c.where}: no scheduler address")
        if _flag(command, "--resources") != resource:
            problems.append(f"{c.where}: dask worker needs --resources {resource}")
        if _flag(command, "--nthreads") != "1":
            problems.append(f"{c.where}: dask worker needs --nthreads 1 (one batch per GPU)")
        if c.gpus != 1:
            problems.append(f"{c.where}: a GPU worker must hold exactly 1 GPU, holds {c.gpus}")
    return problems


def _flag(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command[:-1] else None


def worker_pools(system: System) -> dict[str, str]:
    """pool name -> type, for every `prefect worker start` in the system."""
    pools = {}
    for c in system.containers:
        command = c.runs("prefect", "worker", "start")
        if command:
            pools[str(_flag(command, "--pool"))] = str(_flag(command, "--type"))
    return pools


def check_agreement(compose: System, k8s: System) -> list[str]:
    """Compose and k8s name the shared parts alike, on the same ports, with one image."""
    problems = []
    for name in ("postgres", "prefect-server", "dask-scheduler"):
        for system in (compose, k8s):
            if name not in system.services:
                problems.append(f"{system.name}: no service named {name!r}")
        if compose.services.get(name) != k8s.services.get(name):
            problems.append(
                f"{name}: compose ports {compose.services.get(name)} != k8s {k8s.services.get(name)}"
            )
    images = {}
    for c in compose.containers + k8s.containers:
        images.setdefault(image_name(c.image), set()).add(image_tag(c.image))
    for name, tags in images.items():
        tags.discard("<build>")
        if len(tags) > 1:
            problems.append(f"image {name} has different tags {sorted(tags)}")
    shared_env = ("PREFECT_API_URL", "DASK_SCHEDULER_ADDRESS")
    for key in shared_env:
        values = {c.env[key] for c in compose.containers + k8s.containers if key in c.env}
        if len(values) > 1:
            problems.append(f"{key} differs between containers: {sorted(values)}")
    return problems


def check_deployments(
    deployment_file: dict[str, Any], system: System, reference: dict[str, Any]
) -> list[str]:
    """A Prefect deployment file against the workers of a system and prefect.yaml."""
    problems = []
    pools = worker_pools(system)
    if template_envs(deployment_file.get("pull")) != template_envs(reference["pull"]):
        problems.append("pull steps template other variables than prefect.yaml's")
    nightly = [d for d in reference["deployments"] if d.get("schedules")]
    for d in deployment_file["deployments"]:
        where = f"deployment {d['name']}"
        pool = d["work_pool"]["name"]
        if pool not in pools:
            problems.append(
                f"{where}: no {system.name} worker polls pool {pool!r} (workers: {pools})"
            )
        path, _, function = d["entrypoint"].partition(":")
        source = REPO_ROOT / path
        if not source.is_file():
            problems.append(f"{where}: entrypoint file {path} does not exist")
        elif not re.search(rf"^@flow\(.*\n(?:@.*\n)*def {function}\(", source.read_text(), re.M):
            problems.append(f"{where}: {path} has no flow {function}")
        address = (d.get("parameters") or {}).get("options", {}).get("dask_address", "")
        if address and "{{" not in address:
            host, port = address.removeprefix("tcp://").rsplit(":", 1)
            if int(port) not in system.services.get(host, set()):
                problems.append(f"{where}: dask_address {address} is not a {system.name} service")
        crons = {s["cron"] for s in d.get("schedules") or []}
        if crons and crons != {s["cron"] for n in nightly for s in n["schedules"]}:
            problems.append(f"{where}: schedule {crons} differs from prefect.yaml's")
    return problems


def check_dockerfile(dockerfile: Dockerfile, facts: CodeFacts) -> list[str]:
    problems = []
    torch = next((i for i, r in enumerate(dockerfile.runs) if "torch==" in r), None)
    project = next(
        (i for i, r in enumerate(dockerfile.runs) if re.search(r"pip install \.", r)), None
    )
    if torch is None or project is None or torch > project:
        problems.append("Dockerfile must install torch (pinned) before the project")
    if dockerfile.args.get("TORCH_VERSION") != facts.torch_pin:
        problems.append(
            f"Dockerfile torch {dockerfile.args.get('TORCH_VERSION')} != Makefile {facts.torch_pin}"
        )
    if dockerfile.entrypoint != ["tini", "--"]:
        problems.append(
            "ENTRYPOINT must be only `tini --`: k8s Jobs pass `prefect flow-run execute` as args"
        )
    root = dockerfile.env.get("PULSE_PIPELINE_ROOT")
    if root is None or root != dockerfile.project_root():
        problems.append("PULSE_PIPELINE_ROOT is not where the project is copied")
    copied = {src.rstrip("/") for src, _ in dockerfile.copies}
    for needed in ("flows", "tasks", "pulse_core", "pulse_cli", "pyproject.toml"):
        if needed not in copied:
            problems.append(f"Dockerfile does not copy {needed}")
    if facts.cache_env not in dockerfile.env:
        problems.append(f"Dockerfile does not set {facts.cache_env}")
    return problems


# --------------------------------------------------------------------------------------------
# Fixtures: everything parsed once


@pytest.fixture(scope="module")
def facts() -> CodeFacts:
    return code_facts()


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose_doc() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    return k8s_documents()


@pytest.fixture(scope="module")
def compose(compose_doc, dockerfile) -> System:
    return compose_system(compose_doc, dockerfile)


@pytest.fixture(scope="module")
def k8s(k8s_docs, dockerfile) -> System:
    return k8s_system(k8s_docs, dockerfile, documented_secret_keys())


@pytest.fixture(scope="module")
def prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


# --------------------------------------------------------------------------------------------
# The files as they are


def test_code_facts_are_found_in_the_source(facts):
    """The greps still find what they look for (a refactor must not make the checks vacuous)."""
    assert facts.cache_env == "PULSE_CACHE"
    assert set(facts.credential_envs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "AWS_ENDPOINT_URL" in facts.endpoint_envs
    assert facts.gpu_resource == ("GPU", 1)
    assert facts.pull_envs == ("PULSE_PIPELINE_ROOT",)
    assert "-master.telemetry" in facts.weed_fixed_flags


def test_compose_services_agree_with_the_code_and_each_other(compose, facts):
    assert check_system(compose, facts) == []


def test_k8s_manifests_agree_with_the_code_and_each_other(k8s, facts):
    assert check_system(k8s, facts) == []


def test_compose_and_k8s_share_service_names_ports_and_images(compose, k8s):
    assert check_agreement(compose, k8s) == []


def test_dockerfile_installs_torch_first_and_runs_any_role(dockerfile, facts):
    assert check_dockerfile(dockerfile, facts) == []


def test_prefect_yaml_deployments_have_a_compose_worker(prefect_yaml, compose):
    assert check_deployments(prefect_yaml, compose, prefect_yaml) == []


def test_kubernetes_deployments_have_a_k8s_worker_and_mirror_prefect_yaml(prefect_yaml, k8s):
    k8s_file = yaml.safe_load(PREFECT_K8S_YAML.read_text())
    assert check_deployments(k8s_file, k8s, prefect_yaml) == []
    assert {d["entrypoint"] for d in k8s_file["deployments"]} == {
        d["entrypoint"] for d in prefect_yaml["deployments"]
    }


def test_local_stack_uses_the_same_ports_and_pool(compose, prefect_yaml, facts):
    """`make stack`, compose and prefect.yaml: one port per component, one process pool."""
    assert facts.local_ports == {
        "prefect": next(iter(compose.services["prefect-server"])),
        "s3": next(iter(compose.services["seaweedfs"])),
        "dask": min(compose.services["dask-scheduler"]),
    }
    assert {d["work_pool"]["name"] for d in prefect_yaml["deployments"]} == {facts.local_pool}
    assert worker_pools(compose) == {facts.local_pool: "process"}


def test_every_prefect_variable_is_a_prefect_setting(compose, k8s):
    """Prefect ignores an unknown PREFECT_* variable silently: a typo would go unnoticed."""
    import prefect.settings

    names = {
        k for c in compose.containers + k8s.containers for k in c.env if k.startswith("PREFECT_")
    }
    # Settings of the prefect-kubernetes package (in the image, not in this environment).
    names = {n for n in names if not n.startswith("PREFECT_INTEGRATIONS_KUBERNETES_")}
    assert names and sorted(n for n in names if not hasattr(prefect.settings, n)) == []


def test_dask_commands_use_only_flags_this_dask_knows(compose, k8s):
    from distributed.cli import dask_scheduler, dask_worker

    known = {
        "worker": {o for p in dask_worker.main.params for o in (*p.opts, *p.secondary_opts)},
        "scheduler": {o for p in dask_scheduler.main.params for o in (*p.opts, *p.secondary_opts)},
    }
    unknown = [
        (c.where, word)
        for c in compose.containers + k8s.containers
        for kind in known
        for word in c.runs("dask", kind) or []
        if word.startswith("--") and word not in known[kind]
    ]
    assert unknown == []


def test_seaweedfs_runs_like_the_local_stack(compose, facts):
    """The compose S3 service runs `weed mini` with the flags the tested local stack uses."""
    (weed,) = [c for c in compose.containers if image_name(c.image) == "seaweedfs"]
    assert weed.argv[:2] == ["/usr/bin/weed", "mini"]
    flags = {w.split("=", 1)[0] for w in weed.argv[2:]}
    assert set(facts.weed_fixed_flags) <= flags
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(weed.env)  # credentials enforced
    # The venv's weed first, as infra/processes.py finds it (not imported: it imports torch).
    beside = Path(sys.executable).parent / "weed"
    weed_bin = str(beside) if beside.is_file() else shutil.which("weed")
    if weed_bin is None:
        pytest.skip("no `weed` binary here to list its flags")
    help_text = subprocess.run(
        [weed_bin, "mini", "-h"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=30,
    ).stdout
    listed = set(re.findall(r"^\s+(-[\w.]+)", help_text, re.M))
    assert sorted(flags - listed) == []


def test_kubernetes_worker_may_create_jobs_of_the_pulse_image(k8s_docs, k8s):
    """Its ServiceAccount is bound to a Role that creates Jobs and watches their pods; the
    Jobs' image (the template's default) is the image of every other pulse container."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in k8s_docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (worker,) = [d for d in by_kind["Deployment"] if d["metadata"]["name"] == "prefect-worker"]
    account = worker["spec"]["template"]["spec"]["serviceAccountName"]
    (binding,) = [
        b for b in by_kind["RoleBinding"] if any(s["name"] == account for s in b["subjects"])
    ]
    assert account in {d["metadata"]["name"] for d in by_kind["ServiceAccount"]}
    (role,) = [r for r in by_kind["Role"] if r["metadata"]["name"] == binding["roleRef"]["name"]]
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    assert any("pods" in r["resources"] and "watch" in r["verbs"] for r in role["rules"])
    assert any("pods/log" in r["resources"] for r in role["rules"])

    (job,) = [c for c in k8s.containers if c.role() == "prefect-flow-run"]
    assert {c.image for c in k8s.containers if c.pulse_image} == {job.image}


def test_pods_that_write_the_model_cache_run_as_the_image_user(k8s_docs, dockerfile):
    """The cache claim is made writable through fsGroup: it must be the image user's group."""
    user = re.search(r"useradd --uid (\d+) --gid (\d+)", " ".join(dockerfile.runs))
    assert user, "the Dockerfile no longer creates its user with a fixed uid/gid"
    writers = [
        d
        for d in k8s_docs
        if d["kind"] == "Deployment"
        and any(
            "persistentVolumeClaim" in v for v in d["spec"]["template"]["spec"].get("volumes", [])
        )
    ]
    assert writers
    for d in writers:
        context = d["spec"]["template"]["spec"]["securityContext"]
        assert (context["runAsUser"], context["fsGroup"]) == (int(user[1]), int(user[2]))


# --------------------------------------------------------------------------------------------
# The checks can fail: each mutation of a copy must be reported, by the rule it breaks

Edit = Callable[[Any], None]


def _service(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["services"][name]


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


COMPOSE_MUTATIONS: dict[str, tuple[Edit, str]] = {
    "renamed scheduler service": (
        lambda d: _rename(d["services"], "dask-scheduler", "dask-sched"),
        "DASK_SCHEDULER_ADDRESS names 'dask-scheduler', which is not a service",
    ),
    "worker without the GPU resource": (
        lambda d: _service(d, "dask-gpu-worker").update(
            command=["dask", "worker", "--nthreads", "1"]
        ),
        "needs --resources GPU=1",
    ),
    "model cache not mounted": (
        lambda d: _service(d, "dask-gpu-worker").update(volumes=[]),
        "no volume mounted at PULSE_CACHE=/models",
    ),
    "API on a port nobody serves": (
        lambda d: _service(d, "prefect-worker")["environment"].update(
            PREFECT_API_URL="http://prefect-server:4201/api"
        ),
        "uses prefect-server:4201",
    ),
    "no GPU reserved": (
        lambda d: _service(d, "dask-gpu-worker").pop("deploy"),
        "must hold exactly 1 GPU, holds 0",
    ),
    "pull step into the wrong folder": (
        lambda d: _service(d, "prefect-worker")["environment"].update(
            PULSE_PIPELINE_ROOT="/var/lib/pulse"
        ),
        "PULSE_PIPELINE_ROOT=/var/lib/pulse (prefect.yaml pull step)",
    ),
    "no S3 endpoint for the flow runs": (
        lambda d: _service(d, "prefect-worker")["environment"].pop("AWS_ENDPOINT_URL"),
        "names the S3 service",
    ),
}


@pytest.mark.parametrize("mutation", sorted(COMPOSE_MUTATIONS))
def test_a_broken_compose_copy_is_caught(mutation, compose_doc, dockerfile, facts):
    edit, expected = COMPOSE_MUTATIONS[mutation]
    broken = copy.deepcopy(compose_doc)
    edit(broken)
    problems = check_system(compose_system(broken, dockerfile), facts)
    assert any(expected in p for p in problems), problems


def _k8s_container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (workload,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    return workload["spec"]["template"]["spec"]["containers"][0]


def _rename_service(docs: list[dict[str, Any]], old: str, new: str) -> None:
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == old]
    svc["metadata"]["name"] = new


def _edit_job_container(docs: list[dict[str, Any]], edit: Edit) -> None:
    (cm,) = [d for d in docs if "base-job-template.json" in d.get("data", {})]
    template = json.loads(cm["data"]["base-job-template.json"])
    edit(template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0])
    cm["data"]["base-job-template.json"] = json.dumps(template)


def _replace_word(container: dict[str, Any], old: str, new: str, after: str) -> None:
    """In the container's command, the word after the flag `after` goes from `old` to `new`."""
    command = container["command"]
    index = command.index(after) + 1
    assert command[index] == old
    command[index] = new


K8S_MUTATIONS: dict[str, tuple[Edit, str]] = {
    "renamed Prefect Service": (
        lambda d: _rename_service(d, "prefect-server", "prefect"),
        "PREFECT_API_URL names 'prefect-server', which is not a service",
    ),
    "no GPU limit": (
        lambda d: _k8s_container(d, "dask-gpu-worker")["resources"]["limits"].pop("nvidia.com/gpu"),
        "must hold exactly 1 GPU, holds 0",
    ),
    "cache mounted elsewhere": (
        lambda d: _k8s_container(d, "dask-gpu-worker")["volumeMounts"][0].update(mountPath="/c"),
        "no volume mounted at PULSE_CACHE=/models",
    ),
    "two threads per GPU": (
        lambda d: _replace_word(_k8s_container(d, "dask-gpu-worker"), "1", "2", "--nthreads"),
        "needs --nthreads 1",
    ),
    "scheduler on another port": (
        lambda d: _replace_word(_k8s_container(d, "dask-scheduler"), "8786", "8788", "--port"),
        "listens on [8787, 8788]",
    ),
    "flow-run Jobs without the S3 Secret": (
        lambda d: _edit_job_container(d, lambda c: c.update(envFrom=c["envFrom"][:1])),
        "AWS_SECRET_ACCESS_KEY is not set",
    ),
    "an undocumented Secret key": (
        lambda d: _k8s_container(d, "prefect-server")["env"][0]["valueFrom"]["secretKeyRef"].update(
            key="pw"
        ),
        "Secret pulse-postgres/pw is not in its documented keys",
    ),
}


@pytest.mark.parametrize("mutation", sorted(K8S_MUTATIONS))
def test_a_broken_k8s_copy_is_caught(mutation, k8s_docs, dockerfile, facts):
    edit, expected = K8S_MUTATIONS[mutation]
    broken = copy.deepcopy(k8s_docs)
    edit(broken)
    problems = check_system(k8s_system(broken, dockerfile, documented_secret_keys()), facts)
    assert any(expected in p for p in problems), problems


def test_a_deployment_on_an_unknown_pool_or_flow_is_caught(prefect_yaml, compose):
    broken = copy.deepcopy(prefect_yaml)
    broken["deployments"][0]["work_pool"]["name"] = "pulse-gpu"
    broken["deployments"][1]["entrypoint"] = "flows/restore.py:restore_everything"
    problems = check_deployments(broken, compose, prefect_yaml)
    assert len(problems) == 2, problems
    assert "no compose worker polls pool 'pulse-gpu'" in problems[0]
    assert "has no flow restore_everything" in problems[1]


def test_a_dockerfile_that_installs_the_project_before_torch_is_caught(facts):
    text = DOCKERFILE.read_text()
    torch_line = next(line for line in text.splitlines() if "torch==${TORCH_VERSION}" in line)
    broken = text.replace(torch_line + "\n", "") + torch_line + "\n"
    problems = check_dockerfile(parse_dockerfile(broken), facts)
    assert problems == ["Dockerfile must install torch (pinned) before the project"]
