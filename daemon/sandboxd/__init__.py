"""sandboxd: warm pools of code-execution sandboxes, reconciled from desired state in Redis."""

__version__ = "0.1.0"
