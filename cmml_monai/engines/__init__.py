"""cmml_monai.engines."""
