"""The schedule: which group trains at each step, what trains at every step, and the delayed learning rate."""
