"""plora's parallel layout (the contract) and, later, the model-side pieces built on it."""
