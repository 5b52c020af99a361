"""Export and serving: TF-Serving feature extractor, Model Garden integration."""
