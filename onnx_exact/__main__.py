"""``python -m onnx_exact`` is the same as the ``onnx-exact`` command."""

from .cli import main

main()
