"""liverpipe: liver and liver-tumour segmentation of 3D CT, from NIfTI folders to masks."""

__version__ = "0.1.0"

__all__ = ["__version__"]
