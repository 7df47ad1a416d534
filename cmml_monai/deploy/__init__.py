"""cmml_monai.deploy: serving a trained model (the top layer; empty for now).

It will own what runs a published ``models/model.pt`` outside training: the inference entry point
of the bundle and model export. It may import every layer below it; no other layer imports it.
"""

__all__: list[str] = []
