"""Tiny container images built here, with no registry and no image builder.

A static Go program (standard library only, so `go build` needs nothing from
the module proxy) is packed by this module as a one-layer OCI image archive:
the layer is a tar holding the binary at /<name>, the config names it as the
entrypoint, and `index.json` carries the name in the annotation
`io.containerd.image.name`, which `ctr images import` reads. The node's pod
sandbox ("pause") image and the node test's probe image are made this way
from hack/testbed/images/<name>/.

Archives are cached under $GITOPSD_CACHE/images/, keyed by a hash of the
program's source and the Go version: an unchanged program is not rebuilt.
The archives are reproducible (fixed mtimes, owners and gzip header), so the
same source gives the same image digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

from . import build

SOURCES = Path(__file__).resolve().parent / "images"
PAUSE = "pause"
PROBE = "probe"


def ref(name: str) -> str:
    """The image reference a program's image is imported as."""
    return f"localhost/gitopsd-testbed/{name}:1"


def _source_hash(src: Path) -> str:
    h = hashlib.sha256()
    go = subprocess.run(["go", "env", "GOVERSION"], capture_output=True, text=True).stdout.strip()
    h.update(go.encode())
    for path in sorted(src.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _blob(layout: dict[str, bytes], data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    layout[f"blobs/sha256/{digest.split(':')[1]}"] = data
    return digest, len(data)


def pack(binary: Path, *, name: str, image_ref: str, out: Path) -> Path:
    """Write an OCI image archive running `binary` (copied to /<name>) as `image_ref`."""
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        data = binary.read_bytes()
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    raw = layer_tar.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as f:
        f.write(raw)

    blobs: dict[str, bytes] = {}
    layer_digest, layer_size = _blob(blobs, gz.getvalue())
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": [f"/{name}"], "User": "65534:65534" if name != PAUSE else "65535:65535",
                   "Env": ["PATH=/"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
        "history": [{"created_by": f"hack/testbed/images.py: static Go binary /{name}"}],
    }
    config_digest, config_size = _blob(blobs, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": layer_size}],
    }
    manifest_digest, manifest_size = _blob(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                       "size": manifest_size, "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": image_ref,
                                       "org.opencontainers.image.ref.name": image_ref.rsplit(":", 1)[1]}}],
    }
    files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
             "index.json": json.dumps(index, sort_keys=True).encode(), **blobs}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)
    return out


def archive(name: str) -> Path:
    """The OCI archive of hack/testbed/images/<name>/ (built when its source changed)."""
    src = SOURCES / name
    if not (src / "main.go").exists():
        raise FileNotFoundError(f"no image source {src}/main.go")
    root = build.cache_dir() / "images"
    out = root / f"{name}-{_source_hash(src)}.oci.tar"
    if out.exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    binary = root / f"{name}.bin"
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod -buildvcs=false", "GOTOOLCHAIN": "local"}
    proc = subprocess.run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(binary), "."], cwd=src,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"go build of image {name} failed:\n{proc.stdout}{proc.stderr}")
    for old in root.glob(f"{name}-*.oci.tar"):
        old.unlink()
    pack(binary, name=name, image_ref=ref(name), out=out)
    binary.unlink()
    return out
