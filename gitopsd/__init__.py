"""gitopsd: a GitOps reconciliation daemon.

Git commit -> render -> plan -> apply -> prune -> health -> audit record.
"""

__version__ = "0.1.0"
