"""The exception ``train`` raises for a problem a person must fix (data, options, a resume file).

Library functions raise it (or the ``models`` errors for a weights file); only ``python -m train``
turns it into a message on stderr and exit code 2, so the functions stay usable from Python.
"""

from __future__ import annotations

__all__ = ["TrainError"]


class TrainError(Exception):
    """A run that cannot go on as asked; the message names the input and says what to change."""
