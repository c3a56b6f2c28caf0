"""gdn_lab: a notebook research workbook for Gated DeltaNet."""
__version__ = "0.1.0"
