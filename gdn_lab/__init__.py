"""gdn_lab: a notebook research workbook for Gated DeltaNet."""
__version__ = "0.1.0"
REPO_URL = "https://github.com/gdn-lab/gdn_lab"
