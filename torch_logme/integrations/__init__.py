"""Optional adapters to other libraries, each imported on its own.

- ``torch_logme.integrations.torchmetrics``: ``TransferabilityMetric``, any
  streaming score of ``torch_logme.SCORES`` as a torchmetrics metric, and
  ``LogMEMetric``, its LogME case (needs the ``torchmetrics`` extra).
- ``torch_logme.integrations.lightning``: ``LogMECallback`` (needs the
  ``lightning`` extra).

Importing this package imports neither library.
"""
