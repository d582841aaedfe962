"""Where the model is built: backbones, the label decoder, HybridNet."""
