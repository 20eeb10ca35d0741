"""The engine: one reconcile of one app, stage by stage (DESIGN.md §2).

source (fetch a commit) -> signature (an app with `verify`: the commit's
signature by a trusted key, or nothing further) -> render (plain YAML, kustomize, helm; confined to
the checkout, bounded YAML) -> plan (diff against the live state, dry-run,
ApplySet inventory) -> apply (server-side apply in stages, prune) -> health
(kstatus rules). `sync` runs them top to bottom; the CLI and the daemon both
call it.
"""
