"""The one exception a user's config mistake becomes."""


class ConfigError(ValueError):
    """A config the user wrote is invalid; the message is one line meant for them."""
