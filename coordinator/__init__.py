"""The coordinator: Flower ServerApp, update validation, model registry and admin."""
