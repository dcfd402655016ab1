"""The application wing: the ``adaptive-batch`` command, the demo, the training runner, the
recipes that wire each named policy, and the benchmarks. It uses the library's public API; the
library never imports it."""
