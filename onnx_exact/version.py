"""The onnx-exact release, in one place (the CLI's --version and every JSON report read it)."""

__version__ = "1.0.0"
