"""cmml_monai: Context-driven Missing-Modality Learning (CMML) as a MONAI bundle.

The package is in layers that import only downward (``tests/test_layers.py`` checks it):
``utils`` < ``data`` < ``networks`` < ``losses`` < ``metrics`` < ``engines`` < ``handlers`` <
``evaluation`` < ``deploy``. Each package's ``__init__`` says what its layer owns.
"""

__version__ = "0.1.0"
