"""One module per detector; each registers itself in ``clipguard.detection.DETECTORS``."""
