"""Training a plan: the loop on the Hugging Face ``Trainer``, its callback and the data strategies."""
