"""megareuse: reuse-or-scratch studies and the trainer that runs them."""

__version__ = "0.1.0"
