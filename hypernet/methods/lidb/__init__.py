"""LiDB from scratch: the paper's lightweight adapter trained directly on one identity."""

from hypernet.methods.base import Method
from hypernet.methods.lidb.config import LiDBMethodConfig
from hypernet.methods.lidb.method import LiDBArtifact, train, train_lidb

METHOD = Method("lidb", LiDBMethodConfig, train, LiDBArtifact)

__all__ = ["METHOD", "LiDBArtifact", "LiDBMethodConfig", "train", "train_lidb"]
