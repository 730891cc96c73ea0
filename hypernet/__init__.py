"""hyperdreambooth model library: base models, adapters, personalisation methods, hypernetwork.

The library has no argparse and no I/O beyond explicit load/save functions; the CLI
(`hypernet.cli`), the pretraining recipe (`pretrain`) and the gRPC service (`serving`) are thin
layers around it.
"""

__version__ = "0.1.0"
