"""Flower entry points for FedShop (the logic lives in fedshop.deploy)."""
