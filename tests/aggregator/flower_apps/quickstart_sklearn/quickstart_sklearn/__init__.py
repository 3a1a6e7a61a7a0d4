"""quickstart-sklearn: a Flower / scikit-learn app."""
