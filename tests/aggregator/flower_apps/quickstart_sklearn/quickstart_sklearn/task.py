"""quickstart-sklearn: the model and the data."""

import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

N_CLASSES = 3
N_FEATURES = 4
TEST_FRACTION = 0.2


def get_model(penalty: str, local_epochs: int) -> LogisticRegression:
    return LogisticRegression(penalty=penalty, max_iter=local_epochs, warm_start=True)


def get_model_params(model: LogisticRegression) -> list[np.ndarray]:
    if model.fit_intercept:
        return [model.coef_, model.intercept_]
    return [model.coef_]


def set_model_params(model: LogisticRegression, params: list[np.ndarray]) -> LogisticRegression:
    model.coef_ = params[0]
    if model.fit_intercept:
        model.intercept_ = params[1]
    return model


def set_initial_params(model: LogisticRegression) -> None:
    """Zeros: scikit-learn has no parameters before `fit`, Flower needs some to send."""
    model.classes_ = np.arange(N_CLASSES)
    model.coef_ = np.zeros((N_CLASSES, N_FEATURES))
    if model.fit_intercept:
        model.intercept_ = np.zeros((N_CLASSES,))


def load_data(partition_id: int, num_partitions: int, seed: int):
    """This partition of iris, shuffled once with `seed`: X_train, X_test, y_train, y_test."""
    features, labels = load_iris(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    part = np.array_split(order, num_partitions)[partition_id]
    x, y = features[part], labels[part]
    n_test = int(len(part) * TEST_FRACTION)
    return x[n_test:], x[:n_test], y[n_test:], y[:n_test]
