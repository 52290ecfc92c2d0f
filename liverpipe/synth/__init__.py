"""Realistic synthetic abdominal CT phantoms with liver and tumour labels."""

from liverpipe.synth.anatomy import Anatomy, Tissue, sample_anatomy
from liverpipe.synth.phantom import Acquisition, PhantomCase, render_case
from liverpipe.synth.render import label_of
from liverpipe.synth.writer import generate_dataset, to_nifti, write_case

__all__ = [
    "Acquisition",
    "Anatomy",
    "PhantomCase",
    "Tissue",
    "generate_dataset",
    "label_of",
    "render_case",
    "sample_anatomy",
    "to_nifti",
    "write_case",
]
