"""The dtype names plora's options accept, in a module of their own so that reading options (the CLI,
config files) does not import torch; parallel.hfmodel maps them to torch dtypes."""

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
