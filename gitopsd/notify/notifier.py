"""The daemon's notifier: feed events in (gitopsd.daemon.feed), deliveries out (gitopsd.notify.delivery).

`listen` runs on the publishing runner's thread, so it only decides and
enqueues: which notifiers hear the event is read from the running config at
that moment (a reload that adds a notifier or changes an app's `notify`
counts from the next event; a token is read when the request is sent), whether
it is news from `Memory` (gitopsd.notify.notice says what is not), and whether
each notifier wants it:

- its `events` name the notice's kind (a RolledBack or Held transition
  counts as transition and release);
- a commit status needs a commit (a transition whose fetch failed has none)
  and is a transition's;
- a chat hears a transition when it ends, not when it begins: one message
  per deploy. A JSON webhook hears both (`phase` started, finished).

Nothing here reads the apiserver on the reconcile's thread: a Secret is read
by the delivery worker, through the same CredentialStore as git credentials.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import structlog

from gitopsd import config as config_mod
from gitopsd.daemon.credentials import CredentialStore, check_ca_bundle
from gitopsd.daemon.feed import Event
from gitopsd.errors import GitopsdError
from gitopsd.notify import notice as notice_mod
from gitopsd.notify import payloads
from gitopsd.notify.delivery import Deliveries, Delivery, Policy
from gitopsd.notify.notice import Notice
from gitopsd.notify.payloads import PayloadError, Request

log = structlog.get_logger("gitopsd.notify")


class Notifier:
    def __init__(self, *, config: Callable[[], config_mod.Config], credentials: CredentialStore,
                 ui_url: str | None, policy: Policy | None = None) -> None:
        self._config = config            # the running config, read at each event
        self._credentials = credentials
        self._ui_url = ui_url
        self._memory = notice_mod.Memory()
        self._config_seen: config_mod.Config | None = None
        self.deliveries = Deliveries(policy=policy)

    def start(self) -> None:
        self.deliveries.start()

    def stop(self) -> None:
        """Pending deliveries get a short grace (Policy.grace), then the rest is dropped and counted."""
        self.deliveries.stop()

    def listen(self, event: Event) -> None:
        """The feed listener: enqueue what each notifier of the target wants to hear (module docstring)."""
        config = self._config()
        if config is not self._config_seen:   # a reload: what was told of removed targets goes
            self._config_seen = config
            self._memory.keep({t.key for t in config.targets})
        if event.kind == "status" or not config.notifiers:
            return   # the common case, before any lookup: a fleet without notifiers pays nothing
        cfg = config.target(event.target) or event.cfg
        notifiers = config.notifiers_of(cfg)
        if not notifiers:
            return
        found = self._notice(event, repo=cfg.repo)
        if found is None or (found := self._memory.news(found)) is None:
            return
        for name, notifier in notifiers:
            if wants(notifier, found):
                self.deliveries.put(self._delivery(name, notifier, found))

    @staticmethod
    def _notice(event: Event, *, repo: str) -> Notice | None:
        if event.kind == "revision" and event.revision is not None:
            return notice_mod.of_revision(target=event.target, revision=event.revision, previous=None, repo=repo)
        if event.kind == "record" and event.record is not None:
            return notice_mod.of_record(target=event.target, record=event.record, repo=repo)
        return None

    def _delivery(self, name: str, notifier: config_mod.NotifierConfig, notice: Notice) -> Delivery:
        supersedes = (name, payloads.context(notice), notice.revision) if notifier.commit_status else None
        return Delivery(notifier=name, provider=notifier.provider, notice=notice, supersedes=supersedes,
                        build=lambda: self._request(name, notifier, notice))

    def _request(self, name: str, notifier: config_mod.NotifierConfig, notice: Notice) -> Request:
        """The request, its secrets (and CA bundle) read now (on a delivery worker)."""
        request = self._payload(name, notifier, notice)
        if notifier.ca_from is None:
            return request
        what = f"notifier {name}: caFrom"
        ca = self._credentials.value(notifier.ca_from, key="ca.crt", what=what, secret=False)
        try:
            check_ca_bundle(ca, where=what)
        except GitopsdError as exc:
            raise PayloadError(exc.message, hint=exc.hint) from None   # a retry reads the same; the next notice reads again
        return dataclasses.replace(request, ca=ca)

    def _payload(self, name: str, notifier: config_mod.NotifierConfig, notice: Notice) -> Request:
        what = f"notifier {name}"
        if notifier.commit_status:
            token = self._credentials.value(notifier.token_from, key="token", what=f"{what}: tokenFrom")
            return payloads.commit_status(provider=notifier.provider, notice=notice, token=token,
                                          address=notifier.address, repository=notifier.repository,
                                          ui_url=self._ui_url)
        address = notifier.address or self._address(notifier.address_from, what=f"{what}: addressFrom")
        if notifier.provider == "slack":
            return payloads.slack(notice=notice, address=address, ui_url=self._ui_url)
        key = None
        if notifier.signing_key_from is not None:
            key = self._credentials.value(notifier.signing_key_from, key="signingKey", what=f"{what}: signingKeyFrom")
        return payloads.webhook(notice=notice, address=address, signing_key=key, ui_url=self._ui_url)

    def _address(self, ref: config_mod.ValueFrom, *, what: str) -> str:
        """An address read from a Secret or file, checked as the file's `address` is (never quoted back)."""
        address = self._credentials.value(ref, key="address", what=what)
        try:
            config_mod.check_notify_url(address)
        except ValueError:
            raise PayloadError(f"{what}: the address read is not a usable URL",
                               hint="https://..., or http:// to 127.0.0.1 only") from None
        return address


def wants(notifier: config_mod.NotifierConfig, notice: Notice) -> bool:
    """Whether `notifier` is told `notice` (module docstring)."""
    if not notice.events & set(notifier.event_kinds):
        return False
    if notifier.commit_status:
        return notice.kind == "transition" and notice.revision is not None
    if notifier.provider == "slack":
        return notice.phase != "started"
    return True

