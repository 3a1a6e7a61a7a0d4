"""quickstart-sklearn: a Flower / scikit-learn app."""

import warnings

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.metrics import log_loss

from quickstart_sklearn.task import (
    get_model,
    get_model_params,
    load_data,
    set_initial_params,
    set_model_params,
)

# Flower ClientApp
app = ClientApp()


def _model(msg: Message, context: Context):
    model = get_model(context.run_config["penalty"], context.run_config["local-epochs"])
    set_initial_params(model)
    return set_model_params(model, msg.content["arrays"].to_numpy_ndarrays())


def _data(context: Context):
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    return load_data(partition_id, num_partitions, context.run_config["seed"])


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""
    model = _model(msg, context)
    x_train, _, y_train, _ = _data(context)
    # one iteration per round does not converge, on purpose
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x_train, y_train)
    train_logloss = log_loss(y_train, model.predict_proba(x_train), labels=model.classes_)
    metrics = {"train_logloss": train_logloss, "num-examples": len(x_train)}
    content = RecordDict(
        {"arrays": ArrayRecord(get_model_params(model)), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the model on local data."""
    model = _model(msg, context)
    _, x_test, _, y_test = _data(context)
    loss = log_loss(y_test, model.predict_proba(x_test), labels=model.classes_)
    accuracy = model.score(x_test, y_test)
    metrics = {"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(x_test)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
