"""Data pipeline: convert inputs to canonical records, tokenize and pack them into shards."""
