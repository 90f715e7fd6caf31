#!/usr/bin/env python3
"""Renders the Helm chart offline and checks what it renders.

    manifests.py render            write deploy/rendered/<preset>/ for every preset
    manifests.py check --bin-dir D the rendered files are in sync; every preset and variant
                                   renders, passes yamllint, the Kubernetes schemas, the CRD
                                   checks and the restricted-profile assertions; every
                                   setting the chart passes is one the binaries in D read

The renderer is Helm's own engine (helm-python-sdk, Helm v4 as a library): no helm binary, no
cluster, no network. Every failure is printed and makes the exit status non-zero.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "chart" / "faas-async"
RENDERED = ROOT / "deploy" / "rendered"
PRESETS = ["kubernetes", "openshift", "k3s", "openfaas"]
RELEASE = "faas-async"
NAMESPACE = "faas-async"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas.
KUBE_VERSIONS = ["1.30.0", "1.37.0"]
# Objects whose kinds are CRDs: the Kubernetes schemas do not know them.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("route.openshift.io/v1", "Route"),
}
HEADER = (
    "# Rendered from deploy/chart/faas-async with presets/{preset}.yaml by\n"
    "# scripts/render-deploy.sh (release {release}, namespace {namespace}). Do not edit:\n"
    "# change the chart and run the script; ./test.sh checks that these files are in sync.\n"
)

# Checks only (not committed): the other switches of the chart, rendered and validated too.
VARIANTS = {
    "kubernetes+keda": ("kubernetes", {"keda": {"enabled": True}}),
    "kubernetes+emptydir": ("kubernetes", {"worker": {"persistence": {"enabled": False}}}),
    "kubernetes+external-nats": (
        "kubernetes",
        {
            "nats": {"enabled": False, "externalUrl": "nats://nats.nats.svc.cluster.local:4222"},
            "keda": {
                "enabled": True,
                "natsMonitoringEndpoint": "nats.nats.svc.cluster.local:8222",
            },
        },
    ),
    "kubernetes+secrets+functions": (
        "kubernetes",
        {
            "secretFiles": {"existingSecret": "faas-async-files"},
            "worker": {"functionsConfig": '[functions."train-model"]\nmax_attempts = 2\n'},
        },
    ),
    "defaults": (None, {}),
}


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")
        print(f"FAIL {where}: {what}", file=sys.stderr)


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def preset_values(preset: str | None) -> dict:
    if preset is None:
        return {}
    return yaml.safe_load((CHART / "presets" / f"{preset}.yaml").read_text()) or {}


def clean(text: str) -> str:
    """Trailing blanks and whitespace-only lines the template directives leave behind."""
    lines = [line.rstrip() for line in text.splitlines()]
    out: list[str] = []
    for raw, line in zip(text.splitlines(), lines):
        if line == "" and raw != "":
            continue  # a line of indentation only
        out.append(line)
    while out and out[0] == "":
        out.pop(0)
    return "\n".join(out).strip("\n") + "\n" if any(out) else ""


def render(values: dict) -> dict[str, str]:
    """Template file name -> rendered YAML (empty files dropped). Raises on template errors."""
    from helm_python.chart import Chart  # imported late: only the check needs the engine

    chart = Chart.load(str(CHART))
    chart.validate_schema(values)
    raw = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    files = {}
    for path, text in sorted(raw.items()):
        name = Path(path).name
        if not name.endswith(".yaml"):
            continue
        body = clean(text)
        if body.strip():
            files[name] = body
    return files


def rendered_files(preset: str) -> dict[str, str]:
    header = HEADER.format(preset=preset, release=RELEASE, namespace=NAMESPACE)
    return {name: header + body for name, body in render(preset_values(preset)).items()}


def cmd_render(_args: argparse.Namespace) -> int:
    for preset in PRESETS:
        out = RENDERED / preset
        if out.exists():
            for old in out.glob("*.yaml"):
                old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        files = rendered_files(preset)
        for name, text in files.items():
            (out / name).write_text(text)
        print(f"rendered {preset}: {', '.join(sorted(files))}")
    return 0


# --- checks ---------------------------------------------------------------------------------


def check_in_sync(f: Failures) -> None:
    for preset in PRESETS:
        want = rendered_files(preset)
        have_dir = RENDERED / preset
        have = {p.name: p.read_text() for p in have_dir.glob("*.yaml")} if have_dir.exists() else {}
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                diff = "".join(
                    list(
                        difflib.unified_diff(
                            (have.get(name) or "").splitlines(True),
                            (want.get(name) or "").splitlines(True),
                            f"committed/{preset}/{name}",
                            f"chart/{preset}/{name}",
                        )
                    )[:40]
                )
                f.add(
                    f"rendered/{preset}/{name}",
                    "out of sync with the chart (run scripts/render-deploy.sh)\n" + diff,
                )


def yamllint(f: Failures, files: dict[str, str], where: str) -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(
        "extends: default\n"
        "rules:\n"
        "  line-length: {max: 200}\n"
        "  document-start: disable\n"
        "  indentation: {spaces: consistent, indent-sequences: whatever}\n"
        "  comments: {min-spaces-from-content: 1}\n"
        "  braces: {max-spaces-inside: 1}\n"
        "  truthy: {check-keys: false}\n"
    )
    for name, text in files.items():
        for problem in linter.run(text, conf):
            f.add(f"{where}/{name}:{problem.line}", f"yamllint {problem.rule}: {problem.desc}")


def objects_of(files: dict[str, str], f: Failures, where: str) -> list[tuple[str, dict]]:
    objs = []
    for name, text in files.items():
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            f.add(f"{where}/{name}", f"not YAML: {e}")
            continue
        for doc in docs:
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                f.add(f"{where}/{name}", "a document that is not a Kubernetes object")
                continue
            objs.append((name, doc))
    return objs


def validate_schemas(f: Failures, objs: list[tuple[str, dict]], where: str) -> None:
    import kubernetes_validate

    for name, obj in objs:
        ident = f"{where}/{name} {obj['kind']}/{obj.get('metadata', {}).get('name')}"
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            for problem in check_crd(obj):
                f.add(ident, problem)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                f.add(ident, f"Kubernetes {version} schema: {e.message} at {list(e.path)}")
            except Exception as e:  # noqa: BLE001 - a schema that is missing is a failure too
                f.add(ident, f"Kubernetes {version} schema: {type(e).__name__}: {e}")


def _need(obj: dict, path: str, kind: type | tuple[type, ...]) -> object:
    cur: object = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise ValueError(f"missing {path}")
        cur = cur[part]
    if not isinstance(cur, kind):
        raise ValueError(f"{path} is {type(cur).__name__}, not {kind}")
    return cur


DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def check_crd(obj: dict) -> list[str]:
    """A structural check of our own for the custom resources (no schemas bundled for them)."""
    problems: list[str] = []
    kind = obj["kind"]

    def need(path: str, t: type | tuple[type, ...]) -> object:
        try:
            return _need(obj, path, t)
        except ValueError as e:
            problems.append(str(e))
            return None

    need("metadata.name", str)
    need("metadata.namespace", str)
    extra = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
    if extra:
        problems.append(f"unknown top-level fields {sorted(extra)}")
    if kind == "ServiceMonitor":
        need("spec.selector.matchLabels", dict)
        eps = need("spec.endpoints", list) or []
        if not eps:
            problems.append("no endpoints")
        for ep in eps:
            if not isinstance(ep.get("port"), str) or ep.get("path") != "/metrics":
                problems.append(f"endpoint {ep} needs a named port and path /metrics")
            for key in ("interval", "scrapeTimeout"):
                if key in ep and not DURATION.match(str(ep[key])):
                    problems.append(f"endpoint {key} {ep[key]!r} is not a Prometheus duration")
    elif kind == "PrometheusRule":
        groups = need("spec.groups", list) or []
        for g in groups:
            if not isinstance(g.get("name"), str) or not isinstance(g.get("rules"), list):
                problems.append("a group needs a name and rules")
                continue
            for rule in g["rules"]:
                if not isinstance(rule.get("alert"), str) or not isinstance(rule.get("expr"), str):
                    problems.append(f"rule {rule.get('alert')!r} needs alert and expr strings")
                if "for" in rule and not DURATION.match(str(rule["for"])):
                    problems.append(f"rule {rule['alert']}: for {rule['for']!r} is not a duration")
                if rule.get("expr", "").count("(") != rule.get("expr", "").count(")"):
                    problems.append(f"rule {rule['alert']}: unbalanced parentheses")
                if "{{" in rule.get("expr", ""):
                    problems.append(f"rule {rule['alert']}: template left in expr")
    elif kind == "ScaledObject":
        ref = need("spec.scaleTargetRef", dict) or {}
        if ref.get("kind") not in ("Deployment", "StatefulSet") or not ref.get("name"):
            problems.append("scaleTargetRef must name a Deployment or StatefulSet")
        lo = need("spec.minReplicaCount", int)
        hi = need("spec.maxReplicaCount", int)
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            problems.append("minReplicaCount > maxReplicaCount")
        for trig in need("spec.triggers", list) or []:
            if trig.get("type") != "nats-jetstream":
                problems.append(f"unexpected trigger {trig.get('type')}")
            meta = trig.get("metadata", {})
            for key in ("natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"):
                if not isinstance(meta.get(key), str) or not meta.get(key):
                    problems.append(f"trigger metadata.{key} must be a non-empty string")
    elif kind == "Route":
        to = need("spec.to", dict) or {}
        if to.get("kind") != "Service" or not to.get("name"):
            problems.append("spec.to must name a Service")
        tls = need("spec.tls", dict) or {}
        if tls.get("termination") not in ("edge", "reencrypt", "passthrough"):
            problems.append("spec.tls.termination must be edge, reencrypt or passthrough")
        path = obj.get("spec", {}).get("path")
        if path is not None and not str(path).startswith("/"):
            problems.append("spec.path must start with /")
    return problems


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "Pod":
        return obj["spec"]
    return None


def parse_seconds(value: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"([0-9.]+)\s*(ms|s|m|h|d)", value):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if re.fullmatch(r"[0-9]+", value):
        total = float(value)
    return total


BYTE_SCALE = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_quantity(value: str) -> int | None:
    """A Kubernetes memory quantity (1Gi, 512Mi, 1G, 1000), in bytes."""
    m = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(value))
    return int(m.group(1)) * BYTE_SCALE[m.group(2) or ""] if m else None


def parse_go_bytes(value: str) -> int | None:
    """A size as Go's GOMEMLIMIT takes it (800MiB, 1GiB, 1000B, 1000), in bytes."""
    m = re.fullmatch(r"([0-9]+)(?:(Ki|Mi|Gi|Ti)?B)?", str(value))
    return int(m.group(1)) * BYTE_SCALE[m.group(2) or ""] if m else None


CREDENTIALS_IN_URL = re.compile(r"://[^/\s,]*@")
SECRETISH_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY$|CREDENTIAL)")


def check_pods(
    f: Failures, objs: list[tuple[str, dict]], where: str, env_names: dict[str, set[str]]
) -> None:
    workloads = 0
    for name, obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
        workloads += 1
        ident = f"{where}/{name} {obj['kind']}/{obj['metadata']['name']}"
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            f.add(ident, "pod securityContext.runAsNonRoot is not true")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            f.add(ident, "pod seccompProfile is not RuntimeDefault")
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(forbidden):
                f.add(ident, f"{forbidden} is set")
        for vol in spec.get("volumes") or []:
            if "hostPath" in vol:
                f.add(ident, f"volume {vol['name']} is a hostPath")
        if spec.get("automountServiceAccountToken") is not False:
            f.add(ident, "automountServiceAccountToken is not false (no component uses the API)")
        containers = (spec.get("initContainers") or []) + spec.get("containers", [])
        for c in containers:
            cid = f"{ident} container {c['name']}"
            sc = c.get("securityContext") or {}
            checks = {
                "allowPrivilegeEscalation is false": sc.get("allowPrivilegeEscalation") is False,
                "readOnlyRootFilesystem is true": sc.get("readOnlyRootFilesystem") is True,
                "runAsNonRoot is true": sc.get("runAsNonRoot") is True
                or (psc.get("runAsNonRoot") is True and "runAsNonRoot" not in sc),
                "capabilities.drop is [ALL]": (sc.get("capabilities") or {}).get("drop") == ["ALL"],
                "no capabilities added": not (sc.get("capabilities") or {}).get("add"),
                "seccompProfile RuntimeDefault": (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
                == "RuntimeDefault",
                "not privileged": not sc.get("privileged"),
                "runAsUser is not 0": sc.get("runAsUser", psc.get("runAsUser", 1)) != 0,
            }
            for what, ok in checks.items():
                if not ok:
                    f.add(cid, f"restricted profile: {what} fails")
            if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits"):
                f.add(cid, "resources need requests and limits")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe not in c:
                    f.add(cid, f"no {probe}")
            env = c.get("env") or []
            names = [e["name"] for e in env]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                f.add(cid, f"environment variables set twice: {dupes}")
            for e in env:
                if "secretKeyRef" in (e.get("valueFrom") or {}):
                    f.add(cid, f"{e['name']} comes from a Secret as an env value (mount it as a file)")
                if CREDENTIALS_IN_URL.search(str(e.get("value", ""))):
                    f.add(cid, f"{e['name']} carries credentials in a URL")
                if SECRETISH_NAME.search(e["name"]) and "value" in e:
                    f.add(cid, f"{e['name']} looks like a secret passed as an env value")
            if c.get("envFrom"):
                f.add(cid, "envFrom is not used by this chart (settings are explicit)")
            # The settings our binaries read: only names their --help lists.
            binary = (c.get("command") or [""])[0].rsplit("/", 1)[-1]
            if binary in env_names:
                unknown = sorted(set(names) - env_names[binary])
                if unknown:
                    f.add(cid, f"{binary} does not read {unknown} (not in its --help)")
                grace_var = {"gateway-plugin": "GATEWAY_SHUTDOWN_GRACE", "queue-worker": "QUEUE_WORKER_SHUTDOWN_GRACE"}[binary]
                grace = next((e.get("value") for e in env if e["name"] == grace_var), "30s")
                drain = parse_seconds(grace)
                pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
                tgps = spec.get("terminationGracePeriodSeconds", 30)
                if not tgps > drain + pre:
                    f.add(cid, f"terminationGracePeriodSeconds {tgps} is not above the drain {drain}s + preStop {pre}s")
            elif binary == "nats-server":
                # Go's soft limit below the container's, so the collector runs before the OOM killer.
                limit = parse_quantity(((c.get("resources") or {}).get("limits") or {}).get("memory", ""))
                soft = next((e.get("value") for e in env if e["name"] == "GOMEMLIMIT"), None)
                soft_bytes = parse_go_bytes(soft) if soft is not None else None
                if limit is None:
                    f.add(cid, "nats-server has no memory limit in a form this check reads")
                elif soft_bytes is None:
                    f.add(cid, f"GOMEMLIMIT {soft!r} is not a size Go reads (four fifths of the {limit} byte limit)")
                elif not 0.5 * limit <= soft_bytes < limit:
                    f.add(cid, f"GOMEMLIMIT {soft} is not between half the memory limit and the limit")
            else:
                f.add(cid, f"unexpected command {c.get('command')}")
            mounts = {m["mountPath"] for m in c.get("volumeMounts") or []}
            if binary in env_names and "/tmp" not in mounts:
                f.add(cid, "no volume at /tmp (the root filesystem is read-only)")
            if binary == "queue-worker":
                state = next((e["value"] for e in env if e["name"] == "QUEUE_WORKER_STATE_DIR"), None)
                if not state or not any(state.startswith(m.rstrip("/") + "/") or state == m for m in mounts):
                    f.add(cid, f"state directory {state} is not on a volume")
    if workloads == 0:
        f.add(where, "no workloads rendered")


class Collected(Failures):
    """Failures kept, not printed: for checking that a rule fires."""

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")


def nats_containers(objs: list[tuple[str, dict]]) -> list[dict]:
    return [
        c
        for _, obj in objs
        for c in (pod_spec(obj) or {}).get("containers", [])
        if (c.get("command") or [""])[0].rsplit("/", 1)[-1] == "nats-server"
    ]


def check_memory_rule_fires(f: Failures, objs: list[tuple[str, dict]], where: str) -> None:
    """The GOMEMLIMIT rule of check_pods refuses what it is there to refuse."""
    for value, why in ((None, "unset"), ("2GiB", "above the memory limit"), ("800Mi", "not in Go's form")):
        bad = copy.deepcopy(objs)
        for c in nats_containers(bad):
            env = [e for e in c.get("env") or [] if e["name"] != "GOMEMLIMIT"]
            c["env"] = env + ([{"name": "GOMEMLIMIT", "value": value}] if value else [])
        seen = Collected()
        check_pods(seen, bad, where, {})
        if not any("GOMEMLIMIT" in item for item in seen.items):
            f.add(where, f"the GOMEMLIMIT rule lets a nats-server with GOMEMLIMIT {why} through")


def check_topology(f: Failures, objs: list[tuple[str, dict]], where: str, preset: str | None) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for _, o in objs}
    need = {("Deployment", "faas-async-gateway"), ("Service", "faas-async-gateway"), ("StatefulSet", "faas-async-worker")}
    for k in sorted(need - kinds):
        f.add(where, f"missing {k[0]}/{k[1]}")
    for _, o in objs:
        if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "faas-async-nats":
            conf = next(
                (c for _, c in objs if c["kind"] == "ConfigMap" and c["metadata"]["name"] == "faas-async-nats-config"),
                None,
            )
            replicas = o["spec"]["replicas"]
            text = conf["data"]["nats.conf"] if conf else ""
            if replicas >= 3 and text.count("nats://faas-async-nats-") != replicas:
                f.add(where, "NATS cluster routes do not name every replica")
            if "jetstream" not in text:
                f.add(where, "NATS without JetStream")
            gw = next(c for _, c in objs if c["kind"] == "Deployment")
            env = {e["name"]: e.get("value") for e in gw["spec"]["template"]["spec"]["containers"][0]["env"]}
            want = "3" if replicas >= 3 else "1"
            if env.get("ASYNC_STREAM_REPLICAS") != want:
                f.add(where, f"{replicas} NATS servers but ASYNC_STREAM_REPLICAS={env.get('ASYNC_STREAM_REPLICAS')}")
    if preset in ("kubernetes", "openshift", "openfaas"):
        pdbs = {o["metadata"]["name"] for _, o in objs if o["kind"] == "PodDisruptionBudget"}
        for comp in ("gateway", "worker", "nats"):
            if f"faas-async-{comp}" not in pdbs:
                f.add(where, f"no PodDisruptionBudget for {comp}")
        nps = {o["metadata"]["name"] for _, o in objs if o["kind"] == "NetworkPolicy"}
        for comp in ("gateway", "worker", "nats"):
            if f"faas-async-{comp}" not in nps:
                f.add(where, f"no NetworkPolicy for {comp}")
    if preset == "openshift" and not any(o["kind"] == "Route" for _, o in objs):
        f.add(where, "the OpenShift preset renders no Route")
    if preset == "openshift":
        for _, o in objs:
            spec = pod_spec(o)
            if spec and any(k in (spec.get("securityContext") or {}) for k in ("runAsUser", "fsGroup")):
                f.add(where, f"{o['metadata']['name']}: OpenShift assigns UID and fsGroup; the preset must not fix them")


def help_env_names(bin_dir: Path) -> dict[str, set[str]]:
    names = {}
    for binary in ("gateway-plugin", "queue-worker", "faas-async"):
        out = subprocess.run([str(bin_dir / binary), "--help"], capture_output=True, text=True, check=True).stdout
        names[binary] = set(re.findall(r"\[env: ([A-Z0-9_]+)", out))
        if len(names[binary]) < 10:
            raise SystemExit(f"{binary} --help lists only {len(names[binary])} variables: cannot check settings")
    return names


def check_schema_enums(f: Failures, env_names: dict[str, set[str]]) -> None:
    """values.schema.json's setting names are exactly what the binaries read, less what the
    chart manages itself."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    managed = {
        "NATS_URL", "GATEWAY_LISTEN", "GATEWAY_SHUTDOWN_GRACE", "GATEWAY_DEFAULT_NAMESPACE",
        "ASYNC_STREAM_REPLICAS", "QUEUE_WORKER_STATE_DIR", "QUEUE_WORKER_METRICS_LISTEN",
        "QUEUE_WORKER_SHUTDOWN_GRACE", "QUEUE_WORKER_DEFAULT_NAMESPACE", "QUEUE_WORKER_FUNCTIONS_CONFIG",
    }
    gw, wk = env_names["gateway-plugin"], env_names["queue-worker"]
    want = {
        "settings": (gw & wk) - managed,
        "gateway.settings": gw - managed,
        "worker.settings": wk - managed,
    }
    for path, names in want.items():
        node = schema
        for part in path.split("."):
            node = node["properties"][part]
        have = set(node["propertyNames"]["enum"])
        if have != names:
            f.add(
                f"values.schema.json {path}",
                f"setting names differ from the binaries: extra {sorted(have - names)}, missing {sorted(names - have)}",
            )


def check_values_refused(f: Failures) -> None:
    """The schema refuses a made-up setting and a loosened security context."""
    from helm_python.chart import Chart

    chart = Chart.load(str(CHART))
    for bad in (
        {"gateway": {"settings": {"GATEWAY_MADE_UP": "1"}}},
        {"worker": {"settings": {"NATS_URL": "nats://x:4222"}}},
        {"containerSecurityContext": {"privileged": True}},
        {"podSecurityContext": {"runAsUser": 0}},
        {"nats": {"goMemLimit": "most of it"}},
    ):
        try:
            chart.validate_schema(bad)
        except Exception:  # noqa: BLE001 - any refusal is what we want
            continue
        f.add("values.schema.json", f"accepts {bad}")


def check_lint(f: Failures) -> None:
    from helm_python.chart import lint

    for preset in PRESETS:
        report = lint(str(CHART), preset_values(preset), strict=True)
        for m in report.get("messages", []):
            if m.get("severity", 0) >= 2:
                f.add(f"helm lint {preset}", f"{m.get('path')}: {m.get('error')}")
        for e in report.get("errors", []):
            f.add(f"helm lint {preset}", str(e))


def cmd_check(args: argparse.Namespace) -> int:
    f = Failures()
    env_names = help_env_names(Path(args.bin_dir))
    check_schema_enums(f, env_names)
    check_values_refused(f)
    check_lint(f)
    check_in_sync(f)
    # Values and presets are YAML we write by hand: lint them too.
    yamllint(f, {p.name: p.read_text() for p in [CHART / "values.yaml", *sorted((CHART / "presets").glob("*.yaml"))]}, "chart")
    cases = {p: (p, {}) for p in PRESETS} | VARIANTS
    counted = 0
    for case, (preset, extra) in cases.items():
        where = f"render[{case}]"
        try:
            files = render(deep_merge(preset_values(preset), extra))
        except Exception as e:  # noqa: BLE001 - a template error is a failure of this case
            f.add(where, f"does not render: {e}")
            continue
        yamllint(f, files, where)
        objs = objects_of(files, f, where)
        validate_schemas(f, objs, where)
        check_pods(f, objs, where, env_names)
        if nats_containers(objs):
            check_memory_rule_fires(f, objs, where)
        check_topology(f, objs, where, preset if not extra else None)
        counted += len(objs)
        kinds = sorted({o["kind"] for _, o in objs})
        print(f"ok   {where}: {len(objs)} objects ({', '.join(kinds)})")
    if f.items:
        print(f"\nmanifests: {len(f.items)} problem(s)", file=sys.stderr)
        return 1
    print(f"manifests: {len(cases)} renderings, {counted} objects valid against Kubernetes {', '.join(KUBE_VERSIONS)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("render")
    c = sub.add_parser("check")
    c.add_argument("--bin-dir", required=True, help="directory with gateway-plugin, queue-worker, faas-async")
    args = p.parse_args()
    return {"render": cmd_render, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
