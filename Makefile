# gitopsd developer entry points. `make test` is what CI runs (.ci/run).
VENV     ?= .venv
PYTHON   ?= python3
PY       := $(VENV)/bin/python
CLUSTER  ?= default
# make run CLUSTERS=2: a second cluster, $(CLUSTER)-b, and an app deployed to both.
CLUSTERS ?= 1
TEST_WORKERS ?= 3

.PHONY: venv toolchain test test-unit run cluster-up cluster-down bench image lock clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# Builds (or reuses from ~/.cache/gitopsd) etcd, the Kubernetes control
# plane, kubectl, kwok, kustomize, helm and Prometheus from pinned Go modules
# (`hack/cluster build` without --skip builds Gitea, the test forge, too).
toolchain:
	hack/cluster build --skip gitea

# The whole suite against a real control plane started for the run, in
# TEST_WORKERS pytest-xdist processes sharing it (a file's tests stay in one
# process; TEST_WORKERS=0 runs them all in this one). Gitea
# (only its own tests, run last, need it) builds meanwhile in the background
# under nice 19: a cold run does not wait ~12 minutes for it.
test: venv toolchain
	hack/cluster build --only gitea --background
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Tests that need no control plane and no container image (the kustomize/helm
# ones still run the built binaries: `make toolchain` first on a fresh machine).
test-unit: venv
	$(VENV)/bin/pytest -m "not cluster and not image" $(PYTEST_ARGS)

# The main job: the local control plane plus gitopsd against sample-repo/
# (CLUSTERS=2: plus $(CLUSTER)-b; `make cluster-down CLUSTERS=2` stops both).
run: venv toolchain
	$(PY) hack/quickstart.py --cluster $(CLUSTER) --clusters $(CLUSTERS)

cluster-up: toolchain
	hack/cluster up $(CLUSTER)

cluster-down:
	hack/cluster down $(CLUSTER)
	$(if $(filter 2,$(CLUSTERS)),hack/cluster down $(CLUSTER)-b)

bench: venv toolchain
	$(PY) hack/bench.py

# gitopsd's container image, built with buildah from Debian's packages: no Docker
# engine, no registry (a debootstrap base, the test bed's tools; hack/testbed/image.py).
image: venv toolchain
	$(PY) hack/image build

# requirements.lock (the image's dependencies, pinned with hashes) from pyproject.toml.
lock: venv
	$(VENV)/bin/pip install -q uv
	$(PY) hack/lock

clean:
	rm -rf $(VENV) build dist *.egg-info
