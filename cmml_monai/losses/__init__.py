"""cmml_monai.losses."""
