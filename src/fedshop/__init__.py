"""FedShop: federated recommendation for e-commerce parties that may not pool customer data."""

__version__ = "0.1.0"
