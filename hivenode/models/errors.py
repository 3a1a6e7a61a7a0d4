"""The one exception type of the models part."""


class ModelError(Exception):
    """A model file cannot be identified, loaded, stored or found; the message says why."""
