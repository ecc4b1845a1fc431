"""Evaluation as pycocotools does it (``evaluate``, ``evaluator``), of exported and quantised
models too (``deployed``), and its analysis: PR curves, confusion matrix, worst images."""
