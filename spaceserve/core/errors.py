class SpaceServeError(Exception):
    """Base class of the errors spaceserve raises on purpose."""


class InvalidInputError(SpaceServeError, ValueError):
    """A request's input is malformed; the message names the problem. Other requests are unaffected."""


class ConfigError(SpaceServeError, ValueError):
    """A model directory or engine setting cannot be used; the message says which and why."""
