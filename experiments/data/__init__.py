"""The data builders, by family: where data comes from (sources.py), MNIST / Fashion-MNIST IDX
files as the stock tfds datasets (mnist_idx.py), image classification through tfds offline
(tfds_offline.py), the hypercleaning split (hypercleaning.py), few-shot episodes (episodes.py),
the Omniglot-shaped kanji strokes (kanji_strokes.py) and noisy-label benchmarks (noisy_labels.py)."""
