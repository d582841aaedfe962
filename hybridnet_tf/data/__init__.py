"""Where the data comes in: sources -> (image, multi-hot) -> tf.data pipeline."""
