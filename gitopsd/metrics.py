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
IS_LEADER = Gauge("gitopsd_leader", "1 while this instance holds the leader lease (with --shards N > 1: any shard).",
                  registry=REGISTRY)
WEBHOOKS = Counter(
    "gitopsd_webhook_requests_total", "Push webhooks received, by provider and result.",
    ["provider", "result"], registry=REGISTRY)
HTTP_CONNECTIONS = Counter(
    "gitopsd_http_connections_total",
    "Connections to the HTTP port by how they ended: closed (normally, an idle keep-alive included), "
    "client_gone (reset, broken pipe, timed out mid-request, or cut by the request deadline), "
    "error (a bug, logged with its traceback).",
    ["ended"], registry=REGISTRY)
SHARDS_HELD = Gauge("gitopsd_shards_held",
                    "Shards whose Lease this instance holds (with --shards 1: 1 while it is the leader).",
                    registry=REGISTRY)
APISERVER_THROTTLED = Counter(
    "gitopsd_apiserver_throttled_total",
    "Requests the apiserver refused with 429 (or 503 with Retry-After): API Priority and Fairness, by verb.",
    ["verb"], registry=REGISTRY)
APISERVER_THROTTLE_PAUSE = Counter(
    "gitopsd_apiserver_throttle_pause_seconds_total",
    "Wall-clock seconds every request of the process was held back after a throttle (gitopsd.budget).",
    registry=REGISTRY)
APISERVER_IN_FLIGHT = Gauge(
    "gitopsd_apiserver_requests_in_flight",
    "Requests to the apiserver in flight now (watches and lease renewals not counted).", registry=REGISTRY)
APISERVER_WINDOW = Gauge(
    "gitopsd_apiserver_concurrency_window",
    "Requests allowed in flight now: --concurrency, halved by each throttle and growing back after.",
    registry=REGISTRY)
APISERVER_ATTEMPTS = Histogram(
    "gitopsd_apiserver_request_attempts",
    "Attempts per apiserver request (1 = no retry); bounded by the retry cap.",
    registry=REGISTRY, buckets=(1, 2, 3, 4, 5, 6, 8, 12))
GIT_FETCHES = Counter(
    "gitopsd_git_fetches_total",
    "Fetches of a repository and ref that went to the remote (an ls-remote, and a fetch for a new commit), "
    "by repository (its URL without credentials). The apps of one repository share them: one per poll or push.",
    ["repo"], registry=REGISTRY)
RENDER_CACHE = Counter(
    "gitopsd_render_cache_total",
    "Renders by result: hit (the files it read were unchanged: reused), miss (rendered and kept), "
    "uncached (rendered, not kept: it failed, or reads outside the commit).",
    ["result"], registry=REGISTRY)
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
