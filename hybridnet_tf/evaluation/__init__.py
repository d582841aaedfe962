"""Scores -> numbers: mAP, CP/CR/CF1, OP/OR/OF1, threshold tuning and the evaluation report."""
