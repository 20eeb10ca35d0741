"""The local test bed: a real Kubernetes control plane built from Go modules.

There is no container engine on our machines, so every component (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok,
kustomize, helm, prometheus, gitea) is built from its published Go module into a
cache outside the checkout and started as plain processes on loopback.

`build` knows the pinned versions and how to build them; `cluster` starts,
stops and describes named clusters; `prometheus` runs a real Prometheus
under a cluster's name (no apiserver needed), scraping `exporter`, whose
counters a test sets, for metric gates; `forge` runs a real Gitea in a
directory of its own (push webhooks, commit statuses); `procs` starts and
stops the processes of them all. `hack/cluster` is the command-line face of them all; the
pytest fixtures and the quick start import them directly.
"""
