"""medsass: MedSASS pretraining on Otsu pseudo-masks."""
__version__ = "0.1.0"
