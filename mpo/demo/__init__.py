"""The embedded demo: a small pretrained causal LM shipped with the package and its tasks."""
