"""cmml_monai.data.adapters."""
