"""Optimizer names shared by the CLI and the digits task (no torch import here)."""

#: names accepted by ``scaledl optim bench --optimizer`` and ``digits_task.RunSpec``
OPTIMIZERS = (
    "sgd",
    "cser",
    "cser-block",
    "ef-sgd",
    "qsparse",
    "local-sgd",
    "adagrad",
    "adaalter",
    "local-adaalter",
)
PARTITIONS = ("iid", "label-skew")
