"""The typed training recipe behind ``recipes/train.py``: its configuration and its datasets."""
