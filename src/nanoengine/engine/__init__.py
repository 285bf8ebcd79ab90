"""The engine core: the loop that owns a model, its scheduler, the runner's batched forward pass, sampling, compiling."""
