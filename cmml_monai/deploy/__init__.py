"""cmml_monai.deploy."""
