"""Building a tool's dataclass configs from a parsed jsonargparse namespace, one way for every command.

Kept apart from ``misp.cli`` so that the tool commands (``misp experiment``) and the CLI import it
without importing each other.
"""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

from misp.errors import ConfigError, UserError, innermost_reason


def instantiate_config(parser: ArgumentParser, cfg: Namespace) -> Namespace:
    """``parser``'s dataclass configs built from ``cfg``; a value their own checks refuse becomes a ConfigError."""
    # `instantiate` replaced `instantiate_classes` in jsonargparse 4.49; misp supports older releases too.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    try:
        return instantiate(cfg)
    except UserError:
        raise  # already one line naming the option (a MethodError lists every contradiction)
    except (ValueError, TypeError) as e:
        # Only dataclass configs are built here, so any such error is a refused value.
        raise ConfigError(innermost_reason(e)) from e
