"""UB-SMoE: resource-adaptive federated fine-tuning with sparse mixtures of experts."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``ubsmoe.load_exported(DIR)`` without importing torch and transformers on ``import ubsmoe``."""
    if name == "load_exported":
        from ubsmoe.export import load_exported

        return load_exported
    raise AttributeError(f"module 'ubsmoe' has no attribute {name!r}")
