"""clipguard: train and fine-tune CLIP models that resist data poisoning and backdoors."""

__version__ = "0.1.0"
