"""The metric names a PromQL expression reads, and the queries of the Grafana dashboard and of
the PrometheusRule the chart renders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "faas-async.json"
RULES = ROOT / "deploy" / "rendered" / "kubernetes" / "prometheusrule.yaml"
# Series Prometheus makes itself for every target (not exported by a binary).
PROMETHEUS_OWN = {"up"}
KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "le",
}


def metric_names(expr: str) -> set[str]:
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\$\{?\w+\}?", "", s)  # Grafana variables
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        token = m.group(0)
        rest = s[m.end():].lstrip()
        if rest.startswith("("):
            continue  # a function or aggregation
        if token.lower() in KEYWORDS or re.fullmatch(r"[0-9.e+-]+", token):
            continue
        names.add(token)
    return names


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    dash = json.loads(path.read_text())
    out = []

    def panels(ps: list) -> None:
        for p in ps:
            for t in p.get("targets", []):
                out.append(t["expr"])
            panels(p.get("panels", []))

    panels(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if var.get("type") == "query" and q:
            inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", q.strip())
            out.append(inner.group(1) if inner else q)
    return out


def rule_queries(path: Path = RULES) -> list[str]:
    out = []
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "PrometheusRule":
            for g in doc["spec"]["groups"]:
                out += [r["expr"] for r in g["rules"]]
    return out


def scraped_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def check(scraped: set[str]) -> list[str]:
    """Problems: names a query reads that no binary exported in the scrape."""
    problems = []
    dash = dashboard_queries()
    if len(dash) < 10:
        problems.append(f"the dashboard has only {len(dash)} queries")
    for where, queries in (("dashboard", dash), ("PrometheusRule", rule_queries())):
        if not queries:
            problems.append(f"{where}: no queries found")
        for q in queries:
            names = metric_names(q)
            if not names:
                problems.append(f"{where}: no metric in {q!r}")
            for name in sorted(names - scraped - PROMETHEUS_OWN):
                problems.append(f"{where}: {name} is not exported by the binaries (query {q.strip()!r})")
    return problems
