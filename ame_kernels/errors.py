"""The one exception users catch: bad input is reported before any work is done."""


class MergeError(ValueError):
    """Raised for invalid ingredients, configs or files; the message names the culprit."""
