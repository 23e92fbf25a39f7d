"""The demo: synthetic data, training through a bundle, and a picture of the result."""
