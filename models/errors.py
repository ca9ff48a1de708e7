"""The two exceptions ``models`` raises for problems a person must fix.

- :class:`CheckpointError`: the weights file itself (missing, unreadable, truncated, a SHA-256
  mismatch, not a state_dict, keys or shapes that do not fit the network).
- :class:`ModelConfigError`: what the caller asked for (unknown architecture, format, device or
  precision; a labels list of the wrong length; a task the file cannot serve).

Messages name the file and say what to do; callers show them as they are.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """A weights file that cannot be used as it is."""


class ModelConfigError(Exception):
    """A model description (``ModelSpec``, device, precision) that cannot be honoured."""
