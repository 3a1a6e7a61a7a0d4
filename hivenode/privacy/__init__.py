"""Privacy for federated jobs: differential privacy accounting and secure aggregation."""
