"""Notifications: tell a forge, a chat or any JSON receiver what happened to the apps.

The pieces, in the order an event goes through them:

- gitopsd.notify.notice: what is worth telling. A feed event (gitopsd.daemon.feed)
  becomes a `Notice` — a transition begun or ended, a drift, a release
  request acted on — or nothing (the same commit again, a dry run);
- gitopsd.notify.payloads: the HTTP request each provider documents for a
  notice (GitHub, GitLab and Gitea/Forgejo commit statuses, a Slack-compatible
  message, gitopsd's own JSON body, signed when a key is given);
- gitopsd.notify.delivery: a bounded queue, worker threads and the retry
  policy (exponential backoff with jitter, Retry-After honoured, a bounded
  number of attempts), with a metric and a log line for every outcome;
- gitopsd.notify.notifier: the daemon's side — listens to the feed, picks the
  notifiers of the running config for each event, reads tokens at delivery
  time, and stops with a short grace.

Nothing here runs on a reconcile's thread except the listener, which only
enqueues: a forge that hangs or a chat that is down never delays a deploy.
"""
