"""Adapters that fire loopbridge callbacks from a framework's own training loop.

One module per framework, each importing its framework only when imported itself:
`loopbridge.integrations.lightning` (`pip install loopbridge[lightning]`) and
`loopbridge.integrations.transformers` (`pip install loopbridge[transformers]`).
`ForeignRun` is the part they share, for adapting any other loop the same way.
"""

from loopbridge.integrations._run import ForeignRun

__all__ = ["ForeignRun"]
