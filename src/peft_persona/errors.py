"""The package's error class, raised for anything wrong with a persona mask adapter's files, config or masks."""

from __future__ import annotations


class PersonaAdapterError(ValueError):
    """A persona mask adapter (its files, its config, its masks or its Hub repo) is not what it must be.

    The message names the file, field, tensor, module or repo at fault. It subclasses ``ValueError``, so code that
    catches ``ValueError`` keeps working.
    """


class StatsMismatchError(PersonaAdapterError):
    """A ``stats`` adapter's masks, re-derived from the base weights, do not match the digests saved with them."""
