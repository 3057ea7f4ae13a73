"""Prometheus metrics: one registry per gateway, cheap calls, route templates as labels.

Every gateway has its own :class:`~prometheus_client.CollectorRegistry` (never the global
one), so a test process can run several gateways and scrape each.  The names are part of the
contract (CONTRACT §15, "Metrics").  Label values are bounded: HTTP requests are labelled with
the route *template* (``/api/runs/{run_id}``), never the raw path, and any label fed from the
outside (rejection reasons, close codes, hook names) is capped, so no client can grow the
exposition without bound.

Other modules call the small API on ``gw.metrics``: :meth:`Metrics.rejection`,
:meth:`Metrics.ws_closed`, :meth:`Metrics.ws_message`, :meth:`Metrics.webhook`,
:meth:`Metrics.cron_run`.  Gauges that already live elsewhere (open WebSocket and SSE
streams, active runs, pending approvals, events published) are read at scrape time by a
custom collector instead of being kept twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from gatewayd.errors import GatewayError
from gatewayd.web.common import authenticate, render_error
from gatewayd.web.routes import ROUTES

if TYPE_CHECKING:
    from gatewayd.core import Gateway
    from gatewayd.events import Event
    from gatewayd.store.records import Run

_log = Logger()

#: paths served outside the REST table (fixed resources, streams, adapters); CONTRACT §5-§9.
#: A path matching neither these nor ROUTES is labelled ``other``.
EXTRA_TEMPLATES: tuple[str, ...] = (
    "/",
    "/health",
    "/ready",
    "/metrics",
    "/pair",
    "/rpc",
    "/ws",
    "/ws/chat",
    "/wamp",
    "/tools/invoke",
    "/api/openapi.json",
    "/api/asyncapi.json",
    "/api/events",
    "/api/chat/stream",
    "/api/daemon/logs",
    "/api/config",
    "/api/config/patch",
    "/api/config/apply",
    "/admin/paircode",
    "/admin/shutdown",
    "/hooks/{name}",
    "/bridges/telegram",
    "/bridges/slack/events",
    "/bridges/discord/interactions",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/models/{model}",
    "/v1/responses",
    "/v1/embeddings",
)
#: path prefixes labelled as one route (static files)
PREFIX_TEMPLATES: tuple[tuple[str, str], ...] = (("/app/", "/app/*"),)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: distinct values kept per free-form label before the rest become "other"
MAX_LABEL_VALUES = 64
#: HTTP handling times (seconds); streams land in +Inf
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: a request the client abandoned before the answer (nginx's convention)
CLIENT_CLOSED = "499"
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}|<(?:([a-z]+):)?([A-Za-z_][A-Za-z0-9_]*)>")
_CACHE_MAX = 4096

disable_created_metrics()  # the *_created series double the exposition for no use here


def _template(path: str) -> str:
    """Klein ``<name>`` / ``<conv:name>`` → ``{name}``."""
    return _PARAM.sub(lambda m: "{" + (m.group(1) or m.group(3)) + "}", path)


def _pattern(template: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in _PARAM.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(".+" if m.group(2) == "path" else "[^/]+")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z")


class RouteTable:
    """Raw path → route template, matched once per request against a precompiled table."""

    def __init__(self, paths: Iterable[str]) -> None:
        self._exact: dict[str, str] = {}
        self._patterns: list[tuple[re.Pattern[str], str]] = []
        for path in paths:
            template = _template(path)
            if "{" in template:
                if all(t != template for _, t in self._patterns):
                    self._patterns.append((_pattern(path), template))
            else:
                self._exact[template] = template
        self._cache: dict[bytes, str] = {}

    def resolve(self, raw_path: bytes) -> str:
        found = self._cache.get(raw_path)
        if found is not None:
            return found
        try:
            path = raw_path.decode("utf-8")
        except UnicodeDecodeError:
            return "other"
        found = self._exact.get(path)
        if found is None:
            found = "other"
            for pattern, template in self._patterns:
                if pattern.match(path):
                    found = template
                    break
            else:
                for prefix, template in PREFIX_TEMPLATES:
                    if path.startswith(prefix):
                        found = template
                        break
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[raw_path] = found
        return found


class Metrics:
    """The gateway's metrics; every method is cheap enough to call on the hot path."""

    def __init__(self, gw: Gateway, *, process: bool = True) -> None:
        self._gw = gw
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.routes = RouteTable([*(route.path for route in ROUTES), *EXTRA_TEMPLATES])
        self._requests = Counter(
            "gatewayd_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self._duration = Histogram(
            "gatewayd_http_request_duration_seconds",
            "Time from the request reaching the gateway's resources to its last byte",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self._rejections = Counter(
            "gatewayd_http_rejections",
            "Requests refused before handling, by reason",
            ["reason"],
            registry=r,
        )
        self._ws_closes = Counter(
            "gatewayd_websocket_closes",
            "WebSocket connections closed, by close code",
            ["code"],
            registry=r,
        )
        self._ws_messages = Counter(
            "gatewayd_websocket_messages",
            "WebSocket messages, by direction (in, out)",
            ["direction"],
            registry=r,
        )
        self._runs = Counter(
            "gatewayd_runs", "Agent runs finished, by final status", ["status"], registry=r
        )
        self._run_duration = Histogram(
            "gatewayd_run_duration_seconds",
            "Agent run time from start to its end",
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self._tokens = Counter(
            "gatewayd_tokens",
            "Provider tokens used by runs, by direction (input, output)",
            ["direction"],
            registry=r,
        )
        self._cost = Counter("gatewayd_cost_cents", "Provider cost of runs, in cents", registry=r)
        self._webhooks = Counter(
            "gatewayd_webhooks",
            "Webhook and bridge deliveries, by hook and result",
            ["hook", "result"],
            registry=r,
        )
        self._cron = Counter(
            "gatewayd_cron_runs", "Cron job firings, by result", ["result"], registry=r
        )
        self._approvals_requested = Counter(
            "gatewayd_approvals_requested", "Tool calls that asked for approval", registry=r
        )
        self._approvals_resolved = Counter(
            "gatewayd_approvals_resolved",
            "Approvals settled, by status (approved, denied, expired, cancelled)",
            ["status"],
            registry=r,
        )
        self._bus_lag = Gauge(
            "gatewayd_event_bus_lag_seconds",
            "Delay between an event's publication and its delivery here (latest event)",
            registry=r,
        )
        self._config_changes = Counter(
            "gatewayd_config_changes",
            "Config changes applied, by result",
            ["result"],
            registry=r,
        )
        r.register(_LiveCollector(self))
        if process:
            ProcessCollector(registry=r)
        self.in_flight = 0
        self._req_children: dict[tuple[bytes, str, int], Any] = {}
        self._dur_children: dict[tuple[bytes, str], Any] = {}
        self._labelled: dict[tuple[str, ...], Any] = {}
        self._label_counts: dict[str, int] = {}
        self._tokens_in = self._tokens.labels("input")
        self._tokens_out = self._tokens.labels("output")
        self._ws_in = self._ws_messages.labels("in")
        self._ws_out = self._ws_messages.labels("out")
        gw.run_finished_hooks.append(self.run_finished)
        self._subscription = gw.bus.subscribe(self._on_event)

    # -- HTTP --------------------------------------------------------------------------------

    def wrap(self, resource: IResource) -> IResource:
        """The root resource, timed: start time and the in-flight gauge for every request."""
        return _TimedRoot(self, resource)

    def request_started(self, request: IRequest) -> None:
        if getattr(request, "gw_started", None) is not None:
            return
        request.gw_started = self._gw.clock.seconds()  # type: ignore[attr-defined]
        if request.getHeader(b"upgrade") is not None:
            return  # a WebSocket upgrade is counted as a connection, not a request
        self.in_flight += 1
        request.notifyFinish().addBoth(self._request_done, request)  # type: ignore[attr-defined]

    def _request_done(self, result: Any, request: IRequest) -> None:
        self.in_flight -= 1
        if result is not None:  # the client went away before the answer was finished
            self._count(request, CLIENT_CLOSED)

    def request_finished(self, request: IRequest) -> None:
        """Called from the site's access log for every answered request."""
        self._count(request, getattr(request, "code", 200))

    def _count(self, request: IRequest, status: int | str) -> None:
        method = request.method if request.method.decode("latin-1") in METHODS else b"other"
        route = self.routes.resolve(request.path)
        code = int(status)
        key = (method, route, code)
        child = self._req_children.get(key)
        if child is None:
            child = self._req_children[key] = self._requests.labels(
                method.decode("latin-1"), route, str(code)
            )
        child.inc()
        started = getattr(request, "gw_started", None)
        if started is not None:
            dkey = (method, route)
            timer = self._dur_children.get(dkey)
            if timer is None:
                timer = self._dur_children[dkey] = self._duration.labels(
                    method.decode("latin-1"), route
                )
            timer.observe(max(0.0, self._gw.clock.seconds() - started))

    def rejection(self, reason: str) -> None:
        """A request refused before handling: ``payload_too_large``, ``request_timeout``,
        ``rate_limited``, ``headers_too_large``, ``uri_too_long``, ``too_many_connections``…"""
        self._inc(self._rejections, "reason", reason)

    # -- WebSocket ---------------------------------------------------------------------------

    def ws_closed(self, code: int | None) -> None:
        """A WebSocket closed with ``code`` (None: no close frame, counted as 1006)."""
        self._inc(self._ws_closes, "code", str(1006 if code is None else code))

    def ws_message(self, direction: str) -> None:
        """One WebSocket message ``"in"`` (from the client) or ``"out"``."""
        (self._ws_in if direction == "in" else self._ws_out).inc()

    # -- the rest of the gateway ---------------------------------------------------------------

    def webhook(self, hook: str, result: str) -> None:
        """One delivery to a configured hook or bridge; ``result`` e.g. accepted, duplicate,
        invalid_signature.  Names that are not configured count as ``other``."""
        config = self._gw.config
        if hook not in config.webhooks and getattr(config.bridges, hook, None) is None:
            hook = "other"
        self._inc(self._webhooks, "webhook", hook, result)

    def cron_run(self, result: str) -> None:
        """One cron firing: ``completed``, ``failed``, ``aborted``, ``skipped``…"""
        self._inc(self._cron, "cron", result)

    def config_changed(self, result: str) -> None:
        self._inc(self._config_changes, "config", result)

    def run_finished(self, run: Run) -> None:
        self._inc(self._runs, "runs", run.status)
        if run.finished_at is not None:
            began = run.started_at if run.started_at is not None else run.created_at
            self._run_duration.observe(max(0.0, run.finished_at - began))
        if run.tokens_in:
            self._tokens_in.inc(run.tokens_in)
        if run.tokens_out:
            self._tokens_out.inc(run.tokens_out)
        if run.cost_cents:
            self._cost.inc(run.cost_cents)

    def _on_event(self, event: Event) -> None:
        self._bus_lag.set(max(0.0, self._gw.clock.seconds() - event.ts))
        if event.type == "approval_requested":
            self._approvals_requested.inc()
        elif event.type == "approval_resolved":
            self._inc(
                self._approvals_resolved, "approvals", str(event.payload.get("status", "other"))
            )

    def _inc(self, metric: Any, family: str, *values: str) -> None:
        """Increment one child, creating it once; past the cap, new values become "other"."""
        key = (family, *values)
        child = self._labelled.get(key)
        if child is None:
            if self._label_counts.get(family, 0) >= MAX_LABEL_VALUES:
                key = (family, *("other" for _ in values))
                child = self._labelled.get(key)
            if child is None:
                child = metric.labels(*key[1:]) if values else metric
                self._labelled[key] = child
                self._label_counts[family] = self._label_counts.get(family, 0) + 1
        child.inc()

    # -- exposition ----------------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        self._subscription.cancel()
        if self.run_finished in self._gw.run_finished_hooks:
            self._gw.run_finished_hooks.remove(self.run_finished)


class _LiveCollector(Collector):
    """Gauges whose truth lives elsewhere, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()  # families are known only at collect time; nothing to check for clashes

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        gw = m._gw
        connections = gw.connections
        yield GaugeMetricFamily(
            "gatewayd_http_requests_in_flight",
            "HTTP requests being handled now",
            value=m.in_flight,
        )
        yield GaugeMetricFamily(
            "gatewayd_websocket_connections",
            "Open WebSocket connections",
            value=connections.get("websocket", 0),
        )
        yield GaugeMetricFamily(
            "gatewayd_sse_clients", "Open SSE streams", value=connections.get("sse", 0)
        )
        yield CounterMetricFamily(
            "gatewayd_events_published",
            "Events published on the bus by this process",
            value=getattr(gw.bus, "published", 0),
        )
        yield GaugeMetricFamily(
            "gatewayd_event_bus_subscribers",
            "Event bus subscribers in this process",
            value=getattr(gw.bus, "subscriber_count", 0),
        )
        yield GaugeMetricFamily(
            "gatewayd_runs_active",
            "Runs queued, running or awaiting approval",
            value=getattr(gw.runs, "active_count", 0),
        )
        pending = getattr(gw.approvals, "_pending", None)
        yield GaugeMetricFamily(
            "gatewayd_approvals_pending",
            "Approvals waiting for a decision",
            value=len(pending) if pending is not None else 0,
        )
        yield GaugeMetricFamily(
            "gatewayd_uptime_seconds",
            "Seconds since the gateway started",
            value=max(0.0, gw.clock.seconds() - gw.started_at),
        )
        info = GaugeMetricFamily(
            "gatewayd_build_info", "The running version (always 1)", labels=["version"]
        )
        info.add_metric([gw.version], 1)
        yield info


class _TimedRoot(Resource):
    """Marks each request's start (for the duration histogram) and counts it in flight."""

    isLeaf = True

    def __init__(self, metrics: Metrics, inner: IResource) -> None:
        super().__init__()
        self._metrics = metrics
        self._inner = inner

    def render(self, request: IRequest) -> Any:
        self._metrics.request_started(request)
        return self._inner.render(request)


class MetricsResource(Resource):
    """``GET /metrics``: the text exposition; read scope unless ``gateway.metrics_public``."""

    isLeaf = True

    def __init__(self, gw: Gateway) -> None:
        super().__init__()
        self._gw = gw

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return render_error(
                request,
                GatewayError(
                    "method_not_allowed", "this path serves GET only", data={"allow": "GET, HEAD"}
                ),
            )
        gw = self._gw
        if not gw.config.gateway.metrics_public:
            principal = authenticate(gw, request)
            if principal is None:
                return render_error(
                    request, GatewayError("unauthorized", "a valid bearer token is required")
                )
            if not principal.can("read"):
                return render_error(
                    request, GatewayError("forbidden", "metrics need the read scope")
                )
        body = gw.metrics.exposition()
        request.setResponseCode(200)
        request.setHeader(b"content-type", CONTENT_TYPE_PLAIN_0_0_4.encode())
        request.setHeader(b"cache-control", b"no-store")
        return body
