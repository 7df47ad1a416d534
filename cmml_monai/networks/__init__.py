"""cmml_monai.networks."""
