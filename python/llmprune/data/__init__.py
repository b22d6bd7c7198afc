"""Calibration and evaluation text: where it comes from (sources.py), the tokenizer (tokenizer.py)
and the token windows cut from it (windows.py)."""
