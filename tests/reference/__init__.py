"""Independent oracles: float64 NumPy references written from the equations (CEMA, TimestepNorm,
attention, megalodon-hf's forward pass), TensorBoard's own event reader, and the bridge to the
external megalodon-jax implementation. None of them calls the code it checks."""
