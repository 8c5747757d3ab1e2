"""The one exception type users see: it names the problem and how to fix it."""


class PrunekitError(ValueError):
    """Bad input or an impossible request, detected before any work was done."""
