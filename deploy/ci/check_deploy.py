"""imgate-specific checks of the deployment files that no schema can make.

The schema validators (kubernetes-validate, check-jsonschema) catch unknown fields and
wrong types; this catches what is well-formed but wrong for imgate: a misspelt IMGATE_*
variable, a probe on the wrong path or scheme, a seed list that misses a pod, a gossip
address that is not the node's own, a grace period shorter than the node's drain.

Usage: python3 deploy/ci/check_deploy.py   (from anywhere; needs PyYAML)
Exit status 1 and one line per problem when something is wrong.
"""

import glob
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The node's environment contract (docs/DEPLOY.md, "Configuration by flags and
# environment"); check_contract_in_source() checks that src/ reads each of them.
KNOWN_ENV = {
    "IMGATE_NODE_ID", "IMGATE_CONFIG", "IMGATE_HTTP", "IMGATE_GOSSIP", "IMGATE_QUIC",
    "IMGATE_ADVERTISE", "IMGATE_PUBLIC_URL", "IMGATE_SEEDS", "IMGATE_CLUSTER_ID",
    "IMGATE_TLS_CERT", "IMGATE_TLS_KEY", "IMGATE_CLUSTER_SECRET", "IMGATE_JWT_SECRET",
    "IMGATE_API_KEY", "IMGATE_LOG",
}
SECRET_ENV = {"IMGATE_CLUSTER_SECRET", "IMGATE_JWT_SECRET", "IMGATE_API_KEY"}
# http.shutdown_timeout_ms (10 s by default) plus the exit: a shorter grace period means a
# SIGKILL in the middle of the drain.
MIN_GRACE_S = 15

problems = []


def bad(where, what):
    problems.append(f"{os.path.relpath(where, ROOT)}: {what}")


def check_contract_in_source():
    """Every variable the deployment files may use is one that the binary reads."""
    quoted = set()
    for path in glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True):
        with open(path, encoding="utf-8") as f:
            quoted |= set(re.findall(r'"(IMGATE_[A-Z0-9_]+)"', f.read()))
    for name in sorted(KNOWN_ENV - quoted):
        bad(os.path.join(ROOT, "src"), f"{name} is in the deploy contract but src/ never reads it")


def check_env_names(where, names):
    for name in names:
        if name.startswith("IMGATE_") and name not in KNOWN_ENV:
            bad(where, f"unknown variable {name} (known: {', '.join(sorted(KNOWN_ENV))})")


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def check_kubernetes():
    kdir = os.path.join(ROOT, "deploy", "kubernetes")
    docs = []
    for path in sorted(glob.glob(os.path.join(kdir, "**", "*.y*ml"), recursive=True)):
        docs += [(path, d) for d in load_all(path)]
    by_kind = {}
    for path, d in docs:
        by_kind.setdefault(d.get("kind"), []).append((path, d))
        if "namespace" in d.get("metadata", {}):
            bad(path, f"{d['kind']} {d['metadata'].get('name')} names a namespace")

    sets = by_kind.get("StatefulSet", [])
    if len(sets) != 1:
        bad(kdir, f"expected one StatefulSet, found {len(sets)}")
        return
    path, sts = sets[0]
    name = sts["metadata"]["name"]
    spec = sts["spec"]
    replicas = spec.get("replicas", 1)
    pod = spec["template"]
    labels = pod["metadata"].get("labels", {})
    selector = spec["selector"].get("matchLabels", {})
    if any(labels.get(k) != v for k, v in selector.items()):
        bad(path, f"selector {selector} does not match the pod labels {labels}")
    if spec.get("podManagementPolicy") != "Parallel":
        bad(path, "podManagementPolicy must be Parallel (the pods should join each other at once)")
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if grace < MIN_GRACE_S:
        bad(path, f"terminationGracePeriodSeconds {grace} < {MIN_GRACE_S}")

    headless = [
        (p, s) for p, s in by_kind.get("Service", [])
        if s["metadata"]["name"] == spec.get("serviceName")
    ]
    if not headless:
        bad(path, f"no Service named serviceName {spec.get('serviceName')!r}")
    for p, s in headless:
        if s["spec"].get("clusterIP") != "None":
            bad(p, "the StatefulSet's Service must be headless (clusterIP: None)")
        if not s["spec"].get("publishNotReadyAddresses"):
            bad(p, "publishNotReadyAddresses must be true: pods join through these names")
    for p, s in by_kind.get("Service", []) + by_kind.get("PodDisruptionBudget", []):
        sel = s["spec"].get("selector") or {}
        sel = sel.get("matchLabels", sel)
        if "statefulset.kubernetes.io/pod-name" in sel:
            continue
        if any(labels.get(k) != v for k, v in sel.items()):
            bad(p, f"{s['kind']} {s['metadata']['name']} selects {sel}, not the imgate pods")

    secret_keys = {}
    for p, s in by_kind.get("Secret", []):
        secret_keys[s["metadata"]["name"]] = set((s.get("stringData") or {}) | (s.get("data") or {}))

    containers = pod["spec"]["containers"]
    c = next((c for c in containers if c["name"] == "imgate"), None)
    if c is None:
        bad(path, "no container named imgate")
        return
    env = c.get("env", [])
    names = [e["name"] for e in env]
    check_env_names(path, names)
    for need in ("IMGATE_NODE_ID", "IMGATE_HTTP", "IMGATE_GOSSIP", "IMGATE_QUIC",
                 "IMGATE_SEEDS") + tuple(sorted(SECRET_ENV)):
        if need not in names:
            bad(path, f"container imgate does not set {need}")
    defined = set()
    values = {}
    for e in env:
        if "value" in e:
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(e["value"])):
                if ref not in defined:
                    bad(path, f"{e['name']} uses $({ref}) before it is defined")
            values[e["name"]] = str(e["value"])
        if e["name"] in SECRET_ENV and "value" in e:
            bad(path, f"{e['name']} is written in the manifest: take it from a Secret")
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref["name"] in secret_keys and ref["key"] not in secret_keys[ref["name"]]:
            bad(path, f"{e['name']} reads key {ref['key']} that the example Secret lacks")
        defined.add(e["name"])

    seeds = values.get("IMGATE_SEEDS", "").split(",")
    svc = spec.get("serviceName")
    for i in range(replicas):
        want = f"{name}-{i}.{svc}."
        if not any(s.strip().startswith(want) for s in seeds):
            bad(path, f"IMGATE_SEEDS does not list pod {name}-{i} ({want}...)")
    for var in ("IMGATE_GOSSIP", "IMGATE_QUIC"):
        host = values.get(var, "").rsplit(":", 1)[0]
        if host in ("0.0.0.0", "[::]", ""):
            bad(path, f"{var} must bind an address peers can reach, not {host!r}")

    ports = {p.get("name"): p for p in c.get("ports", [])}
    tls = "IMGATE_TLS_CERT" in names
    want_paths = {"readinessProbe": "/ready", "livenessProbe": "/health", "startupProbe": "/health"}
    for probe, want in want_paths.items():
        get = (c.get(probe) or {}).get("httpGet")
        if get is None:
            if probe != "startupProbe":
                bad(path, f"no {probe} httpGet")
            continue
        if get.get("path") != want:
            bad(path, f"{probe} on {get.get('path')}, want {want}")
        if get.get("port") not in ports and get.get("port") != 9501:
            bad(path, f"{probe} port {get.get('port')!r} is not a container port")
        scheme = get.get("scheme", "HTTP")
        if scheme != ("HTTPS" if tls else "HTTP"):
            bad(path, f"{probe} scheme {scheme} while TLS is {'on' if tls else 'off'}")
    for pname, proto in (("http", "TCP"), ("gossip", "UDP"), ("quic", "UDP")):
        if ports.get(pname, {}).get("protocol", "TCP") != proto:
            bad(path, f"container port {pname} must be {proto}")
    mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
    for var in ("IMGATE_TLS_CERT", "IMGATE_TLS_KEY"):
        if var in values and not any(values[var].startswith(m.rstrip("/") + "/") for m in mounts):
            bad(path, f"{var}={values[var]} is not under a mounted volume")


def seconds(text):
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(text))
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0) if m else 0


def check_compose():
    path = os.path.join(ROOT, "docker-compose.yml")
    (doc,) = load_all(path)
    services = doc["services"]
    for sname, s in services.items():
        env = s.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        check_env_names(path, env)
        for need in ("IMGATE_NODE_ID", "IMGATE_HTTP", "IMGATE_GOSSIP", "IMGATE_QUIC",
                     "IMGATE_SEEDS", "IMGATE_ADVERTISE"):
            if need not in env:
                bad(path, f"service {sname} does not set {need}")
        for var in SECRET_ENV & set(env):
            bad(path, f"service {sname} writes {var} in the file: use the env_file")
        if seconds(s.get("stop_grace_period", "10s")) < MIN_GRACE_S:
            bad(path, f"service {sname} stop_grace_period < {MIN_GRACE_S}s")
        addrs = [n.get("ipv4_address") for n in (s.get("networks") or {}).values() if n]
        for var in ("IMGATE_GOSSIP", "IMGATE_QUIC"):
            host = str(env.get(var, "")).rsplit(":", 1)[0]
            if host not in addrs:
                bad(path, f"service {sname}: {var} host {host} is not its ipv4_address {addrs}")
        for seed in str(env.get("IMGATE_SEEDS", "")).split(","):
            if seed.rsplit(":", 1)[0] not in services:
                bad(path, f"service {sname}: seed {seed} is not a service")
        node = env.get("IMGATE_NODE_ID")
        for var in ("IMGATE_TLS_CERT", "IMGATE_TLS_KEY"):
            if var in env and f"/{node}." not in env[var]:
                bad(path, f"service {sname}: {var} {env[var]} is not node {node}'s file")
        published = [str(p).split(":")[0] for p in s.get("ports", [])]
        adv_port = str(env.get("IMGATE_ADVERTISE", "")).rsplit(":", 1)[-1]
        if adv_port not in published:
            bad(path, f"service {sname}: IMGATE_ADVERTISE port {adv_port} is not published")
    ids = [str((s.get("environment") or {}).get("IMGATE_NODE_ID")) for s in services.values()]
    if len(set(ids)) != len(ids):
        bad(path, f"node ids are not unique: {ids}")


def check_env_files():
    for path in glob.glob(os.path.join(ROOT, "deploy", "**", "*.env*"), recursive=True):
        with open(path, encoding="utf-8") as f:
            names = [l.split("=", 1)[0].strip() for l in f if "=" in l and not l.startswith("#")]
        check_env_names(path, names)


check_contract_in_source()
check_kubernetes()
check_compose()
check_env_files()
for p in problems:
    print(f"check_deploy: {p}")
if problems:
    sys.exit(1)
print("check_deploy: ok (kubernetes, docker-compose.yml, env files)")
