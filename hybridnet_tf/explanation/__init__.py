"""What the model looks at: per-label heat maps (Grad-CAM, decoder attention) and their PNG/JSON files."""
