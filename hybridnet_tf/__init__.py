"""hybridnet_tf: multi-label image classification with a CNN-RNN (HybridNet).

A pretrained CNN looks at the image; a GRU decoder reads out the image's
labels as a sequence, so it learns which labels go together.
"""

__version__ = "0.1.0"
