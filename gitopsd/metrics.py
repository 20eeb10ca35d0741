"""Prometheus metrics: one registry, defined in one place.

The daemon and the sync pipeline record; the HTTP server exposes `/metrics`.
A private registry (not the global default) keeps tests that build several
daemons in one process from colliding.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from array import array

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry(auto_describe=True)


def _target(key: str) -> list[str]:
    """The `app` and `cluster` labels of a target (`app`, or `app@cluster`: gitopsd.config.AppConfig.key).
    The per-app metrics are kept by target and carry both."""
    app, _, cluster = key.partition("@")
    return [app, cluster or "in-cluster"]


class PerAppHistogram:
    """A histogram with one series per app, in ~0.3 KiB an app instead of prometheus_client's ~3.9.

    prometheus_client keeps each bucket of each child as an object with its own
    lock: 4 MiB per thousand apps for one histogram, the largest per-app part of
    the daemon after its desired objects. Here an app's buckets (not cumulative)
    and sum are one array of floats, all apps under one lock; /metrics reads the
    same text (`_bucket{le=...}`, `_count`, `_sum`; no `_created`).
    """

    def __init__(self, name: str, documentation: str, *, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self._name, self._doc = name, documentation
        self._bounds = tuple(float(b) for b in buckets) + (math.inf,)
        self._les = [floatToGoString(b) for b in self._bounds]
        self._lock = threading.Lock()
        self._apps: dict[str, array] = {}
        registry.register(self)

    def observe(self, *, app: str, value: float) -> None:
        at = bisect.bisect_left(self._bounds, value)   # the first bucket whose bound is >= value
        with self._lock:
            counts = self._apps.get(app)
            if counts is None:
                counts = self._apps[app] = array("d", bytes(8 * (len(self._bounds) + 1)))
            counts[at] += 1
            counts[-1] += value

    def forget(self, *, app: str) -> None:
        with self._lock:
            self._apps.pop(app, None)

    def collect(self):
        family = HistogramMetricFamily(self._name, self._doc, labels=["app", "cluster"])
        with self._lock:
            apps = [(app, counts.tolist()) for app, counts in self._apps.items()]
        for app, counts in apps:
            family.add_metric(_target(app), list(zip(self._les, itertools.accumulate(counts[:-1]))), sum_value=counts[-1])
        yield family

    def describe(self):
        yield HistogramMetricFamily(self._name, self._doc, labels=["app", "cluster"])


RECONCILE_DURATION = PerAppHistogram(
    "gitopsd_reconcile_duration_seconds", "Time for one reconcile of one app, fetch to health.",
    registry=REGISTRY, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
class PerAppCounter:
    """A counter with one series per app and further labels, in one float each under one lock
    (prometheus_client's child is ~0.6 KiB: two values with a lock each, a `_created` series).
    /metrics reads `<name>_total{app=...,...}` as before, without `_created`."""

    def __init__(self, name: str, documentation: str, *, labels: tuple[str, ...], registry: CollectorRegistry) -> None:
        self._name, self._doc, self._labels = name, documentation, ("app", *labels)
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, *, app: str, amount: float = 1.0, **labels: str) -> None:
        key = (app, *(labels[name] for name in self._labels[1:]))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def forget(self, *, app: str) -> None:
        with self._lock:
            for key in [k for k in self._values if k[0] == app]:
                del self._values[key]

    def collect(self):
        family = CounterMetricFamily(self._name, self._doc, labels=["app", "cluster", *self._labels[1:]])
        with self._lock:
            values = list(self._values.items())
        for key, value in values:
            family.add_metric([*_target(key[0]), *key[1:]], value)
        yield family

    def describe(self):
        yield CounterMetricFamily(self._name, self._doc, labels=["app", "cluster", *self._labels[1:]])


class PerAppInfo:
    """An info gauge: 1 for one value per app (its last applied revision), the app's previous
    value replaced; one string an app."""

    def __init__(self, name: str, documentation: str, *, label: str, registry: CollectorRegistry) -> None:
        self._name, self._doc, self._label = name, documentation, label
        self._lock = threading.Lock()
        self._values: dict[str, str] = {}
        registry.register(self)

    def set(self, *, app: str, value: str) -> None:
        with self._lock:
            self._values[app] = value

    def forget(self, *, app: str) -> None:
        with self._lock:
            self._values.pop(app, None)

    def collect(self):
        family = GaugeMetricFamily(self._name, self._doc, labels=["app", "cluster", self._label])
        with self._lock:
            values = list(self._values.items())
        for app, value in values:
            family.add_metric([*_target(app), value], 1.0)
        yield family

    def describe(self):
        yield GaugeMetricFamily(self._name, self._doc, labels=["app", "cluster", self._label])


RECONCILE_RESULTS = PerAppCounter(
    "gitopsd_reconcile", "Reconciles by app, trigger and outcome.",
    labels=("trigger", "outcome"), registry=REGISTRY)
DRIFT_DETECTED = PerAppCounter(
    "gitopsd_drift_detected", "Managed objects found changed or deleted outside Git.",
    labels=(), registry=REGISTRY)
DRIFT_CORRECTED = PerAppCounter(
    "gitopsd_drift_corrected", "Drifted objects put back to the desired state.",
    labels=(), registry=REGISTRY)
ROLLOUT_STEPS = PerAppCounter(
    "gitopsd_rollout_steps", "Progressive delivery: canary steps and blue-green phases judged, by strategy and "
    "outcome (healthy, promoted, switched, scaledDown, aborted).", labels=("strategy", "outcome"), registry=REGISTRY)
RELEASE_DECISIONS = PerAppCounter(
    "gitopsd_release_decisions", "Release control: rollbacks (automatic or requested), holds and resumes, by action "
    "and who decided (gitopsd or cli).", labels=("action", "by"), registry=REGISTRY)
LAST_APPLIED = PerAppInfo(
    "gitopsd_last_applied_revision_info", "1 for the revision last applied to the cluster, per app.",
    label="revision", registry=REGISTRY)
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

CLUSTER_REACHABLE = Gauge(
    "gitopsd_cluster_reachable",
    "1 while a cluster gitopsd deploys to answers (probed every few seconds), 0 while it does not: its targets "
    "then report ClusterUnreachable and send it nothing.",
    ["cluster"], registry=REGISTRY)

NOTIFICATIONS = Counter(
    "gitopsd_notifications_total",
    "Notifications (gitopsd.notify) by notifier, provider and result: delivered; retried (an attempt failed and "
    "another follows); failed (given up: a 4xx answer, or the attempts spent; logged with the answer); dropped "
    "(the queue was full, or the daemon stopped first; logged); superseded (a newer commit status of the same "
    "commit and app replaced it before it was sent).",
    ["notifier", "provider", "result"], registry=REGISTRY)
NOTIFICATION_QUEUE = Gauge(
    "gitopsd_notification_queue_depth",
    "Notifications waiting to be sent (or waiting to be tried again), all notifiers together.", registry=REGISTRY)


def forget_app(app: str) -> None:
    """Drop every series of an app taken out of the config: a daemon whose apps come and go
    would otherwise keep the series of every app it ever ran."""
    for metric in (RECONCILE_DURATION, RECONCILE_RESULTS, DRIFT_DETECTED, DRIFT_CORRECTED, LAST_APPLIED,
                   ROLLOUT_STEPS, RELEASE_DECISIONS):
        metric.forget(app=app)
