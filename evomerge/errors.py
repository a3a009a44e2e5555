"""One exception type for every user-facing failure, so the CLI can print one clean line."""


class EvomergeError(Exception):
    """Bad input or state, with a message that names the culprit and the fix."""
