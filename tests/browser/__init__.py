"""The browser tier (pytest marker `browser`): notebooks driven in JupyterLab with headless Chromium.

A package, so that this folder's conftest.py and helper module do not shadow tests/conftest.py.
"""
