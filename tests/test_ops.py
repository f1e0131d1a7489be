"""The operations kit stays true to the code: dashboard queries and alert rules name only
metrics a live saiproxy exports, every exported metric is on the dashboard, and promtool
accepts the rules and their unit tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ROOT, SYSTEM_COOKIE, FakeSai, MakeProxy, Reply, chat

DASHBOARD = ROOT / "deploy" / "grafana" / "saiproxy.json"
PROMETHEUS = ROOT / "deploy" / "prometheus"
# Series Prometheus itself writes for every target.
PROMETHEUS_SERIES = frozenset({"up"})
TARGET_LABELS = frozenset({"job", "instance"})

_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan"}
)
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def metric_names(expr: str) -> set[str]:
    """Return the metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        before = expr[match.start() - 1] if match.start() else " "
        if before.isalnum() or before in "._":
            continue  # part of a number or a duration
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def label_matchers(expr: str) -> Iterator[tuple[str, set[str]]]:
    """Yield each selector's metric name and the label names it matches on."""
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", expr):
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", match.group(2)))
        yield match.group(1), labels


def dashboard_panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from dashboard_panels(panel)


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found = re.fullmatch(r"label_values\((.*),\s*\w+\)", query["query"])
            assert found, query
            queries.append((f"variable {variable['name']}", found.group(1)))
    return queries


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


async def exported(proxy: TestClient[web.Request, web.Application]) -> dict[str, Any]:
    """Return every series name the live /metrics can show, with the labels seen on it."""
    text = await (await proxy.get("/metrics")).text()
    names: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("saiproxy_"):
            continue
        for suffix in _SUFFIXES[family.type]:
            names[family.name + suffix] = {"family": family.name, "labels": None}
        for sample in family.samples:
            entry = names[sample.name]
            entry["labels"] = (entry["labels"] or set()) | set(sample.labels)
    return names


@pytest.fixture
async def live_metrics(make_proxy: MakeProxy, sai: FakeSai) -> dict[str, Any]:
    """A proxy that has served a bit of everything: success, stream, 401, 429, retry."""
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE)
    url = "/v1/chat/completions"
    await proxy.post(url, json=chat(("user", "hi")))
    await proxy.post(url, json=chat(("user", "hi"), stream=True))
    sai.script(Reply(status=401))
    await proxy.post(url, json=chat(("user", "hi")))
    sai.script(Reply(status=429), Reply(status=503), Reply())
    await proxy.post(url, json=chat(("user", "hi")))
    await proxy.get("/v1/models")
    return await exported(proxy)


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
async def test_every_queried_metric_is_exported(live_metrics: dict[str, Any], source: str) -> None:
    queries = dashboard_queries() if source == "dashboard" else alert_queries()
    assert queries
    for where, expr in queries:
        names = metric_names(expr)
        assert names, (where, expr)
        unknown = names - set(live_metrics) - PROMETHEUS_SERIES
        assert not unknown, f"{source} {where!r} queries {sorted(unknown)}, not exported"
        for name, labels in label_matchers(expr):
            seen = live_metrics.get(name, {}).get("labels")
            if seen is None:
                continue  # no sample yet: its labels are not known from outside
            assert labels <= seen | TARGET_LABELS, (where, name, labels - seen)


async def test_every_exported_metric_is_on_the_dashboard(live_metrics: dict[str, Any]) -> None:
    on_dashboard = set()
    for _, expr in dashboard_queries():
        on_dashboard |= metric_names(expr)
    # prometheus_client also exports each counter's and histogram's creation time.
    families = {
        entry["family"]
        for entry in live_metrics.values()
        if not entry["family"].endswith("_created")
    }
    shown = {live_metrics[name]["family"] for name in on_dashboard if name in live_metrics}
    assert families - shown == set()


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{job=~"$job", x="b c"}'
        "[$__rate_interval] offset 5m))) / ignoring(le) b_total > bool 1e3 and on(job) up == 1"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "up"}
    assert list(label_matchers(expr)) == [("a_bucket", {"job", "x"})]


def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = list(dashboard_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["instance"]["includeAll"] and variables["instance"]["multi"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            # Every query follows the replica picker, so one replica or all can be shown.
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return promtool


@pytest.mark.parametrize(
    "command",
    [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
        ["check", "config", "prometheus.yml"],
    ],
    ids=" ".join,
)
def test_promtool_accepts(command: list[str]) -> None:
    result = subprocess.run(
        [_promtool(), *command],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_discovers_the_swarm_tasks() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "saiproxy"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"][0].startswith("tasks.") and sd["port"] == 4000
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "up{" in rule["expr"]:
                assert 'job="saiproxy"' in rule["expr"]


def test_docs_link_every_runbook() -> None:
    docs = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in docs.splitlines()
        if line.startswith("#")
    }
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            runbook = rule["annotations"]["runbook"]
            assert runbook.partition("#")[2] in anchors, runbook
