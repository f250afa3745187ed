"""The store/app daemon: event store, real-time recommendations, local DP training."""
