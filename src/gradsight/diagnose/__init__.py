"""Diagnosis: rules that read a run and name what is wrong, with evidence and advice."""
