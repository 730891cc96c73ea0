"""LiDB from scratch: the paper's lightweight adapter trained directly on one identity."""

from hypernet.methods.base import Method
from hypernet.methods.lidb.batched import LiDBFitData, train_lidb_batch
from hypernet.methods.lidb.config import LiDBMethodConfig
from hypernet.methods.lidb.method import LiDBArtifact, train, train_lidb

METHOD = Method("lidb", LiDBMethodConfig, train, LiDBArtifact)

__all__ = ["METHOD", "LiDBArtifact", "LiDBFitData", "LiDBMethodConfig", "train", "train_lidb", "train_lidb_batch"]
