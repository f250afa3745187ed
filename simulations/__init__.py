"""Local federated simulations on real or synthetic data with the production apps."""
