"""RQ jobs. Each takes plain JSON-able arguments and stores failures as data."""
