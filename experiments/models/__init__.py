"""Models the programs train: the few-shot network of Fig. 8 (fewshot.py), fixed image features
from a pretrained CNN (features.py), and look-ahead example weights (lookahead_weights.py)."""
