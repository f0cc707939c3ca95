"""Teacher inversion: synthetic images + soft labels from a pretrained classifier."""
