"""cmml_monai.data."""
