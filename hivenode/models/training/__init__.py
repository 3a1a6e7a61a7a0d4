"""Framework adapters that train and evaluate a model on a node's local data.

`backend.py` is the contract; one module per framework implements it and imports its
framework lazily; `clientapp.py` wraps them as a Flower ClientApp.
"""
