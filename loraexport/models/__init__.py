"""Model families: what the pipeline needs to know about one kind of model."""
