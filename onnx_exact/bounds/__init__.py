"""Sound bounds on pre-activations: interval and CROWN, CROWN branch and bound on ReLU phases with
optimised slopes (alpha/beta-CROWN style), and the batched input-space branch and bound."""
