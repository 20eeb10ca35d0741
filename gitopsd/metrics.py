"""Prometheus metrics: one registry, defined in one place.

The daemon and the sync pipeline record; the HTTP server exposes `/metrics`.
A private registry (not the global default) keeps tests that build several
daemons in one process from colliding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILE_DURATION = Histogram(
    "gitopsd_reconcile_duration_seconds", "Time for one reconcile of one app, fetch to health.",
    ["app"], registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
RECONCILE_RESULTS = Counter(
    "gitopsd_reconcile_total", "Reconciles by app, trigger and outcome.",
    ["app", "trigger", "outcome"], registry=REGISTRY)
DRIFT_DETECTED = Counter(
    "gitopsd_drift_detected_total", "Managed objects found changed or deleted outside Git.",
    ["app"], registry=REGISTRY)
DRIFT_CORRECTED = Counter(
    "gitopsd_drift_corrected_total", "Drifted objects put back to the desired state.",
    ["app"], registry=REGISTRY)
LAST_APPLIED = Gauge(
    "gitopsd_last_applied_revision_info", "1 for the revision last applied to the cluster, per app.",
    ["app", "revision"], registry=REGISTRY)
APISERVER_REQUESTS = Counter(
    "gitopsd_apiserver_requests_total", "Requests sent to the Kubernetes apiserver, by verb.",
    ["verb"], registry=REGISTRY)
IS_LEADER = Gauge("gitopsd_leader", "1 while this instance holds the leader lease.", registry=REGISTRY)
WEBHOOKS = Counter(
    "gitopsd_webhook_requests_total", "Push webhooks received, by provider and result.",
    ["provider", "result"], registry=REGISTRY)
HTTP_CONNECTIONS = Counter(
    "gitopsd_http_connections_total",
    "Connections to the HTTP port by how they ended: closed (normally, an idle keep-alive included), "
    "client_gone (reset, broken pipe, timed out mid-request, or cut by the request deadline), "
    "error (a bug, logged with its traceback).",
    ["ended"], registry=REGISTRY)
INFORMER_WATCHES = Gauge(
    "gitopsd_informer_watches",
    "Watch streams open to the apiserver, by kind: the shared informers' (one per kind, or one per namespace "
    "where RBAC forbids a cluster-wide watch) and the health wait's temporary watches of a workload's pods.",
    ["kind"], registry=REGISTRY)
INFORMER_OBJECTS = Gauge(
    "gitopsd_informer_objects",
    "Objects held in memory by the informers, by kind: managed objects of registered apps only (and the pods "
    "of a rolling workload during a health wait).",
    ["kind"], registry=REGISTRY)
