"""Optional adapters to other libraries, each imported on its own.

- ``torch_logme.integrations.torchmetrics``: ``LogMEMetric`` (needs the
  ``torchmetrics`` extra).
- ``torch_logme.integrations.lightning``: ``LogMECallback`` (needs the
  ``lightning`` extra).

Importing this package imports neither library.
"""
