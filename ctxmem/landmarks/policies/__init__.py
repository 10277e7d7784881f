"""Landmark selection policies: which landmarks fill the landmark slots, which chunks are restored.

One module per policy, each behind the `Policy` interface of `base`:
- `recent`: the mean entries of the newest landmarks;
- `relevant`: the landmarks whose keys best match the current queries, chosen per layer;
- `retrieve`: landmark keys as an index; the best-matching chunks come back whole (InfLLM's
  memory units, arXiv 2402.04617), and the landmark slots take the next best landmarks.
"""

from __future__ import annotations

from ctxmem.landmarks.policies.base import Policy, Selection
from ctxmem.landmarks.policies.recent import Recent
from ctxmem.landmarks.policies.relevant import Relevant
from ctxmem.landmarks.policies.retrieve import Retrieve

POLICIES = {"recent": Recent, "relevant": Relevant, "retrieve": Retrieve}


def make_policy(name: str, retrieve: int = 0) -> Policy:
    """Return the policy called `name`; `retrieve` is the number of chunks `retrieve` restores."""
    if name not in POLICIES:
        raise ValueError(f"unknown landmark policy {name!r}; use one of: {', '.join(POLICIES)}")
    return Retrieve(retrieve) if name == "retrieve" else POLICIES[name]()


__all__ = ["POLICIES", "Policy", "Recent", "Relevant", "Retrieve", "Selection", "make_policy"]
