"""Static validation of deploy/ (no container engine here): files parse, references resolve, names agree.

Checks: every YAML/JSON parses; compose mounts and build inputs exist; every `host:port` in a command, env
var or config names a service that listens on that port; container commands parse with the real `kvpilot`
CLI; the RayService's Serve config validates against Ray's own schema and names what policy_service/ray_app.py
defines; dashboard queries use only metrics the decoder emits (checked against kvpilot_protocol/telemetry.py too).
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "kvpilot.json"

# OpenTelemetry instrument -> (kind, unit, Prometheus name after the collector's exporter).
METRICS = {
    "kvpilot.kv.memory.usage": ("gauge", "By", "kvpilot_kv_memory_usage_bytes"),
    "kvpilot.evicted_tokens": ("counter", "1", "kvpilot_evicted_tokens_total"),
    "kvpilot.compaction.duration": ("histogram", "s", "kvpilot_compaction_duration_seconds"),
    "kvpilot.policy.round_trip": ("histogram", "s", "kvpilot_policy_round_trip_seconds"),
    "kvpilot.decode.tokens": ("counter", "1", "kvpilot_decode_tokens_total"),
    "kvpilot.policy.fallbacks": ("counter", "1", "kvpilot_policy_fallbacks_total"),
    "kvpilot.policy.decisions_dropped": ("counter", "1", "kvpilot_policy_decisions_dropped_total"),
    "kvpilot.requests": ("counter", "{request}", "kvpilot_requests_total"),
    "gen_ai.server.request.duration": ("histogram", "s", "gen_ai_server_request_duration_seconds"),
    "gen_ai.server.time_to_first_token": ("histogram", "s", "gen_ai_server_time_to_first_token_seconds"),
    "gen_ai.server.time_per_output_token": ("histogram", "s", "gen_ai_server_time_per_output_token_seconds"),
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
PROM_SERIES = {name + suffix for kind, _, name in METRICS.values()
               for suffix in (HISTOGRAM_SERIES if kind == "histogram" else ("",))}

# host:port inside strings; a port followed by '.' or a digit is a version tag (grafana:11.3.0), not a port.
HOST_PORT = re.compile(r"(?<![\w.-])([a-z][a-z0-9-]*):(\d{2,5})(?![\d.])")


def load_yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def strings(node, skip_keys=("image",)):
    """Every string value in a parsed YAML tree (image tags skipped: they look like host:port)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k not in skip_keys:
                yield from strings(v, skip_keys)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v, skip_keys)
    elif isinstance(node, str):
        yield node


def host_ports(texts) -> set[tuple[str, int]]:
    return {(h, int(p)) for t in texts for h, p in HOST_PORT.findall(t)}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())


@pytest.fixture(scope="module")
def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in load_yaml(p)]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_every_file_parses():
    yamls = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(yamls) >= 12, yamls
    for path in yamls:
        docs = load_yaml(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{path} is empty or not a mapping"
    for path in DEPLOY.rglob("*.json"):
        json.loads(path.read_text())
    assert (DEPLOY / "Dockerfile").is_file() and (DEPLOY / "README.md").is_file()


# ---- docker compose ---------------------------------------------------------------------------------------

def compose_ports(service: dict) -> set[int]:
    ports = {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    for p in service.get("ports", []):
        ports.add(int(str(p).split(":")[-1].split("/")[0]))  # "host:container[/proto]" -> container
    return ports


def test_compose_services_reference_each_other(compose):
    services = compose["services"]
    assert {"redis", "decoder", "policy", "otel-collector", "tempo", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in (compose.get("volumes") or {}), f"{name}: named volume {source} is not declared"
    # Every host:port in commands, env, healthchecks and the mounted config files must hit a listening port.
    configs = [DEPLOY / f for f in ("otel-collector.yaml", "prometheus.yaml", "tempo.yaml")] + \
        sorted((DEPLOY / "grafana" / "provisioning").rglob("*.yaml"))
    refs = host_ports(strings(services)) | host_ports(s for p in configs for d in load_yaml(p) for s in strings(d))
    targets = {(h, p) for h, p in refs if h in services}
    assert {("policy", 50052), ("redis", 6379), ("otel-collector", 4317), ("tempo", 4317), ("tempo", 3200),
            ("prometheus", 9090), ("otel-collector", 8889)} <= targets
    for host, port in targets:
        assert port in compose_ports(services[host]), f"{host}:{port} is referenced but {host} does not expose {port}"
    unknown = {h for h, _ in refs} - set(services) - {"localhost"}
    assert not unknown, f"host names that are not compose services: {unknown}"


def test_compose_mounts_and_build_inputs_exist(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == ROOT and (context / build["dockerfile"]).is_file(), name
    # Grafana: the provisioning provider's path is a mounted folder holding the dashboard.
    grafana_mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/dashboards.yaml")[0]["providers"][0]
    assert (grafana_mounts[provider["options"]["path"]] / "kvpilot.json").is_file()
    assert any(grafana_mounts["/etc/grafana/provisioning/datasources"].glob("*.yaml"))
    # Config files are mounted where each command says it reads them.
    for svc, flag in (("otel-collector", "--config="), ("prometheus", "--config.file="), ("tempo", "-config.file=")):
        command = compose["services"][svc]["command"]
        path = next(c.split("=", 1)[1] for c in command if c.startswith(flag))
        mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"][svc]["volumes"]}
        assert path in mounts and (DEPLOY / mounts[path]).is_file(), f"{svc} reads {path}, which is not mounted"


def parse_cli(argv: list[str], where: str):
    from kvpilot.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `kvpilot {' '.join(argv)}` does not parse with the kvpilot CLI: "
                        f"{err.getvalue().strip()}")


def test_container_commands_parse_with_the_cli(compose, k8s_docs):
    services = compose["services"]
    decoder = parse_cli(services["decoder"]["command"], "docker-compose decoder")
    assert decoder.policy_url == "policy:50052"
    assert getattr(decoder, "redis_url", None) == "redis://redis:6379/0"
    policy = parse_cli(services["policy"]["command"], "docker-compose policy")
    assert policy.ray and policy.redis_url == "redis://redis:6379/0" and policy.address.endswith(":50052")
    for path, doc in k8s_docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "kvpilot-decoder":
            args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
            assert getattr(parse_cli(args, str(path)), "redis_url", None) == "redis://redis:6379/0"


def test_dockerfile_defaults_and_inputs():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "FROM ${BASE_IMAGE}" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


# ---- collector, Prometheus, Grafana ------------------------------------------------------------------------

def test_collector_pipelines():
    config = load_yaml(DEPLOY / "otel-collector.yaml")[0]
    otlp = config["receivers"]["otlp"]["protocols"]
    assert otlp["grpc"]["endpoint"].endswith(":4317") and otlp["http"]["endpoint"].endswith(":4318")
    pipelines = config["service"]["pipelines"]
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"pipeline uses undefined {kind[:-1]} {component}"
        assert "batch" in pipeline["processors"]
    assert [config["exporters"][e]["endpoint"] for e in pipelines["traces"]["exporters"]] == ["tempo:4317"]
    assert pipelines["metrics"]["exporters"] == ["prometheus"]
    exporter_port = config["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    scrape = load_yaml(DEPLOY / "prometheus.yaml")[0]["scrape_configs"]
    assert any(f"otel-collector:{exporter_port}" in t for job in scrape for sc in job["static_configs"]
               for t in sc["targets"])


def test_metric_names_match_the_decoder_instruments():
    # The instruments kvpilot_protocol/telemetry.py creates, and the names the Prometheus exporter gives them.
    source = (ROOT / "kvpilot_protocol" / "telemetry.py").read_text()
    created = {m.group(2): (m.group(1), m.group(3)) for m in re.finditer(
        r'create_(counter|histogram|observable_gauge|gauge)\(\s*"([^"]+)",\s*unit="([^"]*)"', source)}
    for otel, (kind, unit, prom) in METRICS.items():
        assert otel in created, f"kvpilot_protocol/telemetry.py no longer creates {otel}"
        assert created[otel][0].endswith(kind) and created[otel][1] == unit, (otel, created[otel])
        # The exporter's rule: dots -> underscores, unit suffix (By -> bytes, s -> seconds, 1 -> none),
        # then _total for counters.
        expected = otel.replace(".", "_") + {"By": "_bytes", "s": "_seconds", "1": "", "{request}": ""}[unit]
        assert prom == expected + ("_total" if kind == "counter" else "")


def test_dashboard_queries_use_known_metrics(dashboard):
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    # Label names (kvpilot_policy, kvpilot_kind) live in `by (...)` groupings and `{...}` selectors: drop those.
    bare = [re.sub(r"\b(by|without)\s*\([^)]*\)|\{[^}]*\}", "", e) for e in exprs]
    used = {m for e in bare for m in re.findall(r"\b(?:kvpilot|gen_ai)_[a-z0-9_]+", e)}
    assert used and used <= PROM_SERIES, f"unknown metrics in dashboard queries: {used - PROM_SERIES}"
    for _, _, prom in METRICS.values():
        assert any(u.startswith(prom) for u in used), f"no panel shows {prom}"
    for e in exprs:
        assert e.count("(") == e.count(")"), e


def test_dashboard_panels_and_datasources(dashboard):
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/datasources.yaml")[0]["datasources"]
    uids = {d["uid"]: d["type"] for d in datasources}
    assert uids == {"prometheus": "prometheus", "tempo": "tempo"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for words in ("kv bytes", "evicted tokens/s per policy", "compaction seconds", "policy round trip",
                  "decode tokens/s", "fallbacks/s", "decisions dropped/s", "traces", "time to first token",
                  "request duration", "time per output token", "errors/s by status"):
        assert words in titles, words
    for panel in dashboard["panels"]:
        for ds in [panel["datasource"]] + [t["datasource"] for t in panel.get("targets", [])]:
            assert uids.get(ds["uid"]) == ds["type"], (panel["title"], ds)
    quantile_panels = [p for p in dashboard["panels"] if "p95" in p["title"]]
    assert len(quantile_panels) == 5  # compaction, policy round trip, TTFT, request duration, time per token
    for p in quantile_panels:
        assert [t["expr"].split(",")[0] for t in p["targets"]] == ["histogram_quantile(0.5", "histogram_quantile(0.95"]
    trace_queries = " ".join(t.get("query", "") for p in dashboard["panels"] if p["datasource"]["uid"] == "tempo"
                             for t in p["targets"])
    for span in ('span.gen_ai.provider.name = "kvpilot"', 'name = "compaction"', 'name = "decide"', "kvpilot-decoder", "kvpilot-policy"):
        assert span in trace_queries, span


# ---- Kubernetes -----------------------------------------------------------------------------------------

def pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]]
    if doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return []


def test_k8s_manifests_are_consistent(k8s_docs):
    kustomization = next(d for _, d in k8s_docs if d["kind"] == "Kustomization")
    files = {p.name for p, d in k8s_docs if d["kind"] != "Kustomization"}
    assert set(kustomization["resources"]) == files, "kustomization resources and deploy/k8s files differ"
    objects = [d for _, d in k8s_docs if d["kind"] != "Kustomization"]
    for d in objects:
        assert d.get("apiVersion") and d["metadata"].get("name"), d
    kinds = {(d["kind"], d["metadata"]["name"]) for d in objects}
    assert {("Deployment", "kvpilot-decoder"), ("Service", "kvpilot-decoder"), ("Deployment", "redis"),
            ("Service", "redis"), ("RayService", "kvpilot-policy"), ("Deployment", "otel-collector")} <= kinds
    for d in objects:
        if d["kind"] == "Deployment":
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), d["metadata"]["name"]

    # Services select pods that exist and name container ports those pods declare.
    templates = [t for d in objects for t in pod_templates(d)]
    service_ports: dict[str, set[int]] = {}
    for svc in (d for d in objects if d["kind"] == "Service"):
        selector = {k: v for k, v in svc["spec"]["selector"].items() if not k.startswith("ray.io/")}  # KubeRay's own
        matched = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        assert matched, f"Service {svc['metadata']['name']} selects no pod template"
        for port in svc["spec"]["ports"]:
            for t in matched:
                names = {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports", [])}
                numbers = {p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names | numbers, (svc["metadata"]["name"], port)
        service_ports[svc["metadata"]["name"]] = {p["port"] for p in svc["spec"]["ports"]}

    # KubeRay creates <name>-head-svc / <name>-serve-svc; Tempo comes from its Helm chart (see deploy/README.md).
    external = {"tempo": {3200, 4317, 4318}, "kvpilot-policy-serve-svc": {8000},
                "kvpilot-policy-head-svc": {6379, 8265, 10001}}
    texts = list(strings(objects))
    embedded = [v for d in objects if d["kind"] == "ConfigMap" for v in d["data"].values()]
    embedded += [d["spec"]["serveConfigV2"] for d in objects if d["kind"] == "RayService"]
    texts += [s for text in embedded for s in strings(yaml.safe_load(text))]
    refs = host_ports(texts)
    assert {("kvpilot-policy-grpc", 50052), ("redis", 6379), ("otel-collector", 4317), ("tempo", 4317)} <= refs
    for host, port in refs:
        known = service_ports.get(host, external.get(host))
        assert known is not None, f"{host}:{port} names no Service"
        assert port in known, f"{host}:{port}: the Service does not serve port {port}"


def test_k8s_collector_config_is_the_compose_one(k8s_docs):
    config_map = next(d for _, d in k8s_docs if d["kind"] == "ConfigMap")
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == load_yaml(DEPLOY / "otel-collector.yaml")[0]
    deployment = next(d for _, d in k8s_docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "otel-collector")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    mount = container["volumeMounts"][0]["mountPath"]
    assert f"--config={mount}/config.yaml" in container["args"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic v1-style fields inside ray.serve
@pytest.mark.filterwarnings("error::FutureWarning")  # Ray warns about configs it will reject later: fail now
def test_rayservice_serve_config(k8s_docs):
    from ray.serve.schema import ServeDeploySchema

    rayservice = next(d for _, d in k8s_docs if d["kind"] == "RayService")
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(serve_config)  # Ray's own validation of the Serve config

    grpc = serve_config["grpc_options"]
    for func in grpc["grpc_servicer_functions"]:
        module, attr = func.rsplit(".", 1)
        assert callable(getattr(__import__(module, fromlist=[attr]), attr)), func
    # The gRPC Service forwards to the proxy's port on every Ray pod.
    grpc_ports = {p["containerPort"] for t in pod_templates(rayservice) for c in t["spec"]["containers"]
                  for p in c["ports"] if p["name"] == "grpc"}
    assert grpc_ports == {grpc["port"]}

    # The application and deployment names are the ones policy_service/ray_app.py defines.
    (app,) = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    tree = ast.parse(source)
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | \
        {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert attr in top, f"{app['import_path']}: {module} defines no {attr}"
    assert f'APP_NAME = "{app["name"]}"' in source
    assert app.get("route_prefix"), "without a route prefix Serve's gRPC proxy has no ingress to route to"
    for dep in app["deployments"]:
        assert f'name="{dep["name"]}"' in source, f"ray_app.py has no deployment named {dep['name']}"
        auto = dep["autoscaling_config"]
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"]
        assert auto["target_ongoing_requests"] < dep["max_ongoing_requests"], "Serve would never scale up"
        assert auto["look_back_period_s"] <= auto["downscale_delay_s"]
    workers = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in workers)
