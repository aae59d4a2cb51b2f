"""Training: the loops (``loop`` for the built-in models, ``hf`` for Hugging Face ones) and their
data (``data``, ``data_hf``)."""
