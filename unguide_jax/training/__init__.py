"""What every trainer shares: the training loop and metrics log, Orbax checkpoints, device-mesh sharding."""
