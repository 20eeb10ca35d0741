"""The daemon (`gitopsd run`): what runs the engine for many apps, for as long as it lives.

- core: the Daemon: lifecycle, leadership, the set of apps;
- runner: one app's execution, self-heal and status;
- triggers: what wakes an app (poll schedule, push webhooks, local repos);
- informers: watch-fed caches of managed objects;
- config_watch: hot reload of the config file;
- credentials: git credentials from Secrets or files;
- leader: the Lease and the write fence; server, webhook: HTTP;
- status: the per-app status ConfigMaps.
"""

from gitopsd.daemon.core import Daemon, main
from gitopsd.daemon.runner import AppRunner

__all__ = ["AppRunner", "Daemon", "main"]
