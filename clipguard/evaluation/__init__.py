"""Zero-shot, linear probe, retrieval, attack success rate and poison-detection metrics."""
