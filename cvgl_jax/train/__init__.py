"""Training: losses, state, pure steps and the epoch loop."""
