"""UB-SMoE: resource-adaptive federated fine-tuning with sparse mixtures of experts."""

__version__ = "0.1.0"
