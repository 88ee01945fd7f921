"""Everything that touches ONNX files: loading and checks, reading graphs into the IR (MLPs and
sequential CNNs), input domains (CLI strings, files, VNN-LIB, metadata), onnxruntime sessions, the
in-place MLP writer, exact channel pruning, staging and atomic saving, parameter and MAC counts."""
