"""Sub-commands of the ``peft-persona`` CLI, one module each, each with ``register(subparsers)``."""
