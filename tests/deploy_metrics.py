"""Metric names used by the Prometheus rules and the Grafana dashboard in deploy/.

`metric_names_used()` parses every PromQL expression in deploy/prometheus/alerts.yaml and
deploy/grafana/ntk-dashboard.json and returns the metric names their selectors name, as written
(sample names: `ntk_request_duration_seconds_bucket`, not the histogram family). Compare it with
a live scrape by sample name:

    scraped = {s.name for f in text_string_to_metric_families(body) for s in f.samples}
    missing = set(metric_names_used()) - scraped - SYNTHETIC_METRICS

`metric_family()` maps a sample name back to the name the server registers, for checks against
`SERVER_METRICS`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import promql_parser
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
ALERTS_FILE = REPO_ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD_FILE = REPO_ROOT / "deploy" / "grafana" / "ntk-dashboard.json"

# The metric names the server exports (the contract between deploy/ and ntk_server.metrics).
SERVER_METRICS = frozenset(
    {
        "ntk_requests_total",
        "ntk_request_duration_seconds",
        "ntk_kernel_blocks_total",
        "ntk_kernel_entries_total",
        "ntk_stream_bytes_total",
        "ntk_queue_depth",
        "ntk_queue_limit",
        "ntk_inflight_requests",
        "ntk_device_memory_bytes",
        "ntk_device_memory_peak_bytes",
        "ntk_device_memory_limit_bytes",
        "ntk_models_registered",
        "ntk_build_info",
    }
)
# Series that Prometheus writes itself for every target; never in the server's exposition.
SYNTHETIC_METRICS = frozenset({"up"})
HISTOGRAMS = frozenset({"ntk_request_duration_seconds"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Grafana's interval variables are not PromQL; a fixed duration stands in for parsing.
_GRAFANA_INTERVAL = re.compile(
    r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}"
)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*(?:,\s*\w+\s*)?\)\s*$")


def metric_family(name: str) -> str:
    """The registered metric a sample name belongs to (`x_bucket` of histogram `x` -> `x`)."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in HISTOGRAMS:
            return base
    return name


def alert_expressions(path: Path = ALERTS_FILE) -> Iterator[tuple[str, str]]:
    """(rule name, PromQL) for every rule of a Prometheus rule file."""
    rules = yaml.safe_load(path.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], rule["expr"]


def dashboard_expressions(path: Path = DASHBOARD_FILE) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable of a Grafana dashboard.

    Panels nested in collapsed rows are included. A `label_values(selector, label)` variable
    yields its selector.
    """
    dashboard = json.loads(path.read_text())

    def panels(items: list[dict]) -> Iterator[dict]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"panel {panel['title']!r} target {target.get('refId')}", target["expr"]

    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        match = _LABEL_VALUES.match(query or "")
        if match is None:
            raise ValueError(
                f"dashboard variable {variable['name']!r}: expected label_values(selector[, label])"
                f", got {query!r}"
            )
        yield f"variable {variable['name']!r}", match["selector"]


def parse_promql(expr: str) -> promql_parser.Expr:
    """Parse PromQL, with Grafana's interval variables replaced by a fixed duration.

    Raises ValueError naming the problem when the expression is not valid PromQL.
    """
    return promql_parser.parse(_GRAFANA_INTERVAL.sub("5m", expr))


def selector_names(expr: str) -> set[str]:
    """Metric names of every vector selector in one PromQL expression."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name != "__name__":
                    continue
                if matcher.op != promql_parser.MatchOp.Equal:
                    raise ValueError(
                        f"{expr!r}: a __name__ matcher other than '=' names no fixed metric; "
                        f"name the metric instead"
                    )
                names.add(matcher.value)

    promql_parser.walk(parse_promql(expr), visit)
    return names


def metric_names_used(
    alerts_file: Path = ALERTS_FILE, dashboard_file: Path = DASHBOARD_FILE
) -> list[str]:
    """Sorted metric (sample) names named by the alert rules and the dashboard."""
    names: set[str] = set()
    for _, expr in (*alert_expressions(alerts_file), *dashboard_expressions(dashboard_file)):
        names |= selector_names(expr)
    return sorted(names)
