"""quickstart-sklearn: a Flower / scikit-learn app."""

import json
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from quickstart_sklearn.task import get_model, get_model_params, set_initial_params

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    num_rounds: int = context.run_config["num-server-rounds"]

    # Create LogisticRegression model with zeros as its initial parameters
    model = get_model(context.run_config["penalty"], context.run_config["local-epochs"])
    set_initial_params(model)
    arrays = ArrayRecord(get_model_params(model))

    # Initialize FedAvg strategy
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=1)

    # Start strategy, run FedAvg for `num_rounds`
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=num_rounds)

    # Save the per-round metrics where the run config says
    results_path = context.run_config["results-path"]
    if results_path:
        rounds = {str(r): dict(metrics) for r, metrics in result.evaluate_metrics_clientapp.items()}
        Path(results_path).write_text(json.dumps({"evaluate": rounds}))
