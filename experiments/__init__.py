"""The experiments, one module each: `make experiment NAME=<name>` (see `experiments.runner`)."""
