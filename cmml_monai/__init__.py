"""cmml_monai: Context-driven Missing-Modality Learning (CMML) as a MONAI bundle.

Layout follows the architecture: ``data`` -> ``networks`` -> ``losses`` -> ``engines`` ->
``handlers`` -> ``deploy``.
"""

__version__ = "0.1.0"
