"""cmml_monai.handlers."""
