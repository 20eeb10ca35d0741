"""Memory: the daemon's use of glibc's allocator (gitopsd.daemon.memory).

The figures themselves (RSS at 1,000 apps, where it goes) are the fleet
benchmark's (hack/fleet_bench.py). Here: a real `gitopsd run` caps its
malloc arenas whatever its thread count, a trim really hands free heap pages
back to the kernel, and the trimmer trims only after memory was freed in
bulk (pure logic, with fakes).
"""

from __future__ import annotations

import ctypes
import threading

import pytest
from helpers import app_entry, configmap, wait_audit, write_config

from gitopsd.daemon import memory

glibc = pytest.mark.skipif(memory._LIBC is None, reason="glibc's allocator only")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024.0


@glibc
@pytest.mark.cluster
def test_daemon_runs_on_two_malloc_arenas_whatever_its_threads(repo, kube, namespace, tmp_path, start_daemon):
    from fleet_bench import proc_status, smaps_by_kind

    for i in range(5):
        repo.write(f"app-{i}/cms.yaml", [configmap(f"cm-{i}-{j}", {"value": str(j)}) for j in range(5)])
    repo.commit("five apps")
    cfg = write_config(tmp_path / "config.yaml",
                       [app_entry(f"app-{i}", repo.url, namespace, path=f"app-{i}") for i in range(5)])
    daemon = start_daemon(cfg, "--no-leader-elect", "--no-watch-local")
    for i in range(5):
        wait_audit(daemon, f"app-{i} applied", app=f"app-{i}", result="Applied")
    threads = int(proc_status(daemon.proc.pid)["Threads"])
    arenas = smaps_by_kind(daemon.proc.pid)["arenas (count)"]
    assert threads > 10, f"only {threads} threads: nothing to contend for an arena"
    # glibc's main arena (the [heap]) plus at most ARENAS - 1 others; uncapped, one per contending thread
    # up to 8 per core (15 on two cores at 20 apps).
    assert arenas <= memory.ARENAS - 1, f"{arenas} malloc arenas besides the main one for {threads} threads"


@glibc
def test_trim_hands_free_heap_pages_back_to_the_system():
    libc = memory._LIBC
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = []
    for _ in range(60_000):   # ~60 MiB in 1 KiB blocks: below the mmap threshold, so in the heap
        p = libc.malloc(1000)
        ctypes.memset(p, 1, 1000)
        blocks.append(p)
    for i, p in enumerate(blocks):
        if i % 200:           # keep one in 200 (and the last): the heap cannot shrink from its top
            libc.free(p)
    kept = blocks[::200]
    before = rss_mib()
    assert memory.trim(), "malloc_trim found nothing to release"
    after = rss_mib()
    for p in kept:
        libc.free(p)
    assert before - after > 30, f"RSS {before:.0f} -> {after:.0f} MiB"


def test_trimmer_trims_only_after_memory_was_freed_in_bulk():
    free = [1 << 20]
    released = []
    trimmer = memory.Trimmer(stopped=threading.Event(), threshold=8 << 20, free=lambda: free[0],
                             release=lambda: released.append(free[0]) or True)
    assert not trimmer.check(), "a quiet daemon is not trimmed"
    free[0] = 40 << 20
    assert trimmer.check() and released == [40 << 20]
    free[0] = 2 << 20   # what the trim gave back is gone from glibc's free lists
    assert not trimmer.check() and trimmer.trims == 1


def test_trimmer_stops_with_the_daemon():
    stopped = threading.Event()
    trimmer = memory.Trimmer(stopped=stopped, every=0.01, free=lambda: 0, release=lambda: True)
    t = threading.Thread(target=trimmer.run)
    t.start()
    stopped.set()
    t.join(5)
    assert not t.is_alive() and trimmer.trims == 0
